//! The one signature scheme and header names of every webhook wakeeper sends: the host's state and message
//! events and the sweep's alerts, so one receiver checks all of them the same way.
//!
//! Every delivery carries the [Standard Webhooks](https://www.standardwebhooks.com/) headers, which the stock
//! libraries (`standardwebhooks`, Svix) verify: `webhook-id` (the event's id, the same on every retry: the
//! receiver's idempotency key), `webhook-timestamp` (Unix seconds of this attempt, so a receiver refuses a
//! replay) and `webhook-signature: v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`. The key is the
//! secret in the `whsec_<base64>` form decoded, or the secret's own bytes when it is not in that form.
//!
//! The older headers stay for receivers written against them: `X-Wakeeper-Signature: sha256=<hex of
//! HMAC-SHA256(secret, body)>` over the secret's text, and `X-Wakeeper-Event-Id`.

use std::fmt::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Standard Webhooks: the event's id.
pub const WEBHOOK_ID_HEADER: &str = "webhook-id";
/// Standard Webhooks: Unix seconds of the attempt.
pub const WEBHOOK_TIMESTAMP_HEADER: &str = "webhook-timestamp";
/// Standard Webhooks: `v1,<base64 signature>`.
pub const WEBHOOK_SIGNATURE_HEADER: &str = "webhook-signature";
/// The prefix of a Standard Webhooks secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Signs deliveries with one receiver secret. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct Signer {
    /// The secret's text, for the older `X-Wakeeper-Signature`.
    text: Vec<u8>,
    /// The Standard Webhooks key.
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

impl Signer {
    /// A signer for `secret`: `whsec_<base64>` (its decoded bytes are the key), or any other non-empty text (its
    /// bytes are the key). The error never quotes the secret.
    pub fn new(secret: &str) -> Result<Self, String> {
        let secret = secret.trim();
        if secret.is_empty() {
            return Err("the webhook secret is empty".into());
        }
        let key = match secret.strip_prefix(SECRET_PREFIX) {
            Some(b64) => STANDARD
                .decode(b64)
                .map_err(|_| format!("the webhook secret starts with `{SECRET_PREFIX}` but the rest is not base64"))?,
            None => secret.as_bytes().to_vec(),
        };
        if key.is_empty() {
            return Err("the webhook secret's key is empty".into());
        }
        Ok(Self { text: secret.as_bytes().to_vec(), key })
    }

    /// `v1,<base64 of HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
    pub fn standard_signature(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// Every signature header of one attempt to deliver event `id` with `body` at `timestamp` (Unix seconds).
    pub fn headers(&self, id: &str, timestamp: u64, body: &[u8]) -> [(&'static str, String); 5] {
        [
            (WEBHOOK_ID_HEADER, id.to_owned()),
            (WEBHOOK_TIMESTAMP_HEADER, timestamp.to_string()),
            (WEBHOOK_SIGNATURE_HEADER, self.standard_signature(id, timestamp, body)),
            (SIGNATURE_HEADER, sign(&self.text, body)),
            (EVENT_ID_HEADER, id.to_owned()),
        ]
    }
}

/// Whether `url` may receive signed events: `https://`, or `http://` to a loopback host (`127.0.0.0/8`, `::1`,
/// `localhost`: a receiver on the same machine), or any `http://` when `allow_http` (a private network the
/// operator vouches for). Anything else carries signed events in the clear and is refused, naming only the
/// scheme and host.
pub fn check_url(url: &str, allow_http: bool) -> Result<(), String> {
    use url::Host;
    let parsed = url::Url::parse(url).map_err(|e| format!("not a webhook URL ({e}): it must start with https://"))?;
    let host = parsed.host().ok_or_else(|| "a webhook URL has no host".to_string())?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if allow_http => Ok(()),
        "http" => {
            let loopback = match &host {
                Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
                Host::Ipv4(ip) => ip.is_loopback(),
                Host::Ipv6(ip) => ip.is_loopback(),
            };
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "http://{host} would carry signed events in the clear: use https://, or allow plain http on a \
                     private network explicitly"
                ))
            }
        }
        other => Err(format!("`{other}://` is not a webhook scheme (https:// or http://)")),
    }
}

/// Unix seconds now, for `webhook-timestamp`.
pub fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The header carrying the body's signature, `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-Wakeeper-Signature";
/// The header carrying the event's id (the idempotency key).
pub const EVENT_ID_HEADER: &str = "X-Wakeeper-Event-Id";

/// `sha256=<hex of HMAC-SHA256(secret, body)>`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity("sha256=".len() + 2 * tag.len());
    out.push_str("sha256=");
    for b in tag {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_signature_is_the_specs() {
        // The Standard Webhooks specification's own example (its reference libraries test the same vector).
        let signer = Signer::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signer.standard_signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        for ok in ["https://bot.example/hook", "http://127.0.0.1:9/hook", "http://localhost/x", "http://[::1]:80/"] {
            assert_eq!(check_url(ok, false), Ok(()), "{ok}");
        }
        for bad in ["http://bot.example/hook", "http://10.0.0.5/hook", "http://user:pw@bot/x", "ftp://x/", "bot/x"] {
            let e = check_url(bad, false).unwrap_err();
            assert!(!e.contains("pw"), "{e}");
        }
        assert_eq!(check_url("http://10.0.0.5/hook", true), Ok(()));
        assert!(check_url("ftp://x/", true).is_err());
    }

    #[test]
    fn secrets_in_either_form_and_never_shown() {
        let plain = Signer::new("hook-s3cret").unwrap();
        assert_eq!(plain.key, b"hook-s3cret");
        let headers = plain.headers("evt-1", 7, b"{}");
        assert_eq!(headers[3], (SIGNATURE_HEADER, sign(b"hook-s3cret", b"{}")));
        assert!(!format!("{plain:?}").contains("s3cret"));
        for bad in ["", "  ", "whsec_not base64!", "whsec_"] {
            let e = Signer::new(bad).unwrap_err();
            assert!(!e.contains("not base64!"), "{e}");
        }
    }

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_key_longer_than_a_block_is_hashed_first() {
        // RFC 4231, test case 6: secrets are the operator's choice, of any length.
        assert_eq!(
            sign(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First"),
            "sha256=60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert_eq!(SIGNATURE_HEADER.to_ascii_lowercase(), "x-wakeeper-signature");
        assert_eq!(EVENT_ID_HEADER.to_ascii_lowercase(), "x-wakeeper-event-id");
    }
}
