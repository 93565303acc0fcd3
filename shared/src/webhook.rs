//! The one signature scheme and header names of every webhook wakeeper sends: the host's state and message
//! events and the sweep's alerts, so one receiver checks all of them the same way.
//!
//! The body is signed with HMAC-SHA256 under the receiver's shared secret and sent as
//! `X-Wakeeper-Signature: sha256=<hex>`; `X-Wakeeper-Event-Id` carries the event's id, the receiver's
//! idempotency key.

use std::fmt::Write;

use hmac::{Hmac, Mac};
use sha2::Sha256;

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
