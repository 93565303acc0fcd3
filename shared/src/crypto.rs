//! Encryption of every stored record: AES-256-GCM, a random 96-bit nonce per record, and the tenant id,
//! record kind and record key as associated data, so a record copied to another tenant or key does not
//! decrypt. The data key comes from a [`KeySource`]: a local key file (created 0600 on first use only where the
//! caller allows it: the one-machine default), or a key given as base64 ([`StaticKey::from_base64`], a platform
//! secret held in a variable); a KMS-backed source can implement the same trait.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;

use crate::domain::{RecordKey, TenantId};
/// The data-key port, here beside the sources that implement it.
pub use crate::ports::KeySource;

/// `bytes` random bytes from the OS, as lowercase hex (ids, generated tokens).
pub fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).expect("the OS random source works");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed record adds to its plaintext.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Errors of the crypto layer. Never carries key material or plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The ciphertext is truncated, altered, or belongs to another tenant/key, or the key is wrong.
    #[error("record does not decrypt (altered, moved, or sealed with another key)")]
    Undecryptable,
    /// The key source could not produce a key.
    #[error("data key unavailable: {0}")]
    KeyUnavailable(String),
}

/// A data key kept in a local file (32 raw bytes, mode 0600): created on first use, or only read. Read like an
/// OpenSSH key: a symlink, or a file group or others may read, is refused.
pub struct LocalKeyFile {
    path: PathBuf,
    create: bool,
}

impl LocalKeyFile {
    /// A key file at `path` (created by [`KeySource::data_key`] when absent).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), create: true }
    }

    /// A key file at `path` that must exist: a missing file is an error, never a new key. For keys that seal
    /// records stored elsewhere (a cloud store), where a new key would make every stored record unreadable.
    pub fn existing(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), create: false }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl KeySource for LocalKeyFile {
    fn data_key(&self) -> Result<[u8; 32], CryptoError> {
        let unavailable =
            |what: &str, e: std::io::Error| CryptoError::KeyUnavailable(format!("{what} {}: {e}", self.path.display()));
        match crate::private_files::read_secret_file(&self.path) {
            Ok(Some(bytes)) => bytes
                .try_into()
                .map_err(|_| CryptoError::KeyUnavailable(format!("{} is not a 32-byte key", self.path.display()))),
            Ok(None) if !self.create => Err(CryptoError::KeyUnavailable(format!(
                "{} does not exist (a key is never generated for records stored elsewhere)",
                self.path.display()
            ))),
            Ok(None) => {
                if let Some(dir) = self.path.parent() {
                    crate::private_files::private_dir(dir).map_err(|e| CryptoError::KeyUnavailable(e.to_string()))?;
                }
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(|e| CryptoError::KeyUnavailable(e.to_string()))?;
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                match opts.open(&self.path) {
                    Ok(mut f) => {
                        f.write_all(&key).map_err(|e| unavailable("writing", e))?;
                        f.sync_all().map_err(|e| unavailable("syncing", e))?;
                        Ok(key)
                    }
                    // Another process created it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self.data_key(),
                    Err(e) => Err(unavailable("creating", e)),
                }
            }
            Err(e) => Err(CryptoError::KeyUnavailable(e.to_string())),
        }
    }
}

/// A fixed key, for tests and for keys obtained elsewhere (a platform secret, or decrypted by KMS at start-up).
/// Its `Debug` never shows the key.
#[derive(Clone)]
pub struct StaticKey(pub [u8; 32]);

impl StaticKey {
    /// A key given as base64 (standard alphabet, padding optional, surrounding whitespace ignored) of exactly
    /// 32 bytes. The error says what is wrong, never the value.
    pub fn from_base64(encoded: &str) -> Result<Self, CryptoError> {
        let encoded = encoded.trim().trim_end_matches('=');
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(encoded)
            .map_err(|_| CryptoError::KeyUnavailable("the key is not valid base64".into()))?;
        let len = bytes.len();
        bytes.try_into().map(Self).map_err(|_| {
            CryptoError::KeyUnavailable(format!("the key is {len} bytes, not 32 (base64 of 32 random bytes)"))
        })
    }
}

impl fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticKey(<redacted>)")
    }
}

impl KeySource for StaticKey {
    fn data_key(&self) -> Result<[u8; 32], CryptoError> {
        Ok(self.0)
    }
}

/// A data key's name: the first 8 bytes of HMAC-SHA256 under the key of a fixed label, as 16 hex digits. It
/// tells two keys apart and reveals nothing about either, so it may be stored beside what the key sealed and
/// shown in logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyFingerprint(String);

impl KeyFingerprint {
    /// The fingerprint of `key`.
    pub fn of(key: &[u8; 32]) -> Self {
        use hmac::{KeyInit, Mac};
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length");
        mac.update(b"wakeeper data key fingerprint v1");
        let digest = mac.finalize().into_bytes();
        Self(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A fingerprint as stored (16 lowercase hex digits); `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then(|| Self(s.into()))
    }

    /// The 16 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One data key, ready to use.
#[derive(Clone)]
struct Key {
    aead: Aes256Gcm,
    fingerprint: KeyFingerprint,
}

impl Key {
    fn new(key: &[u8; 32]) -> Self {
        Self { aead: Aes256Gcm::new(key.into()), fingerprint: KeyFingerprint::of(key) }
    }
}

/// Seals records with the current data key and opens what it or, during a key rotation, the previous key
/// sealed.
#[derive(Clone)]
pub struct Cipher {
    current: Key,
    previous: Option<Key>,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cipher").field("fingerprint", &self.current.fingerprint.as_str()).finish_non_exhaustive()
    }
}

impl Cipher {
    /// A cipher over the key from `source`.
    pub fn from_source(source: &dyn KeySource) -> Result<Self, CryptoError> {
        Ok(Self::new(&source.data_key()?))
    }

    /// A cipher over `key`.
    pub fn new(key: &[u8; 32]) -> Self {
        Self { current: Key::new(key), previous: None }
    }

    /// This cipher, also opening what `previous` sealed (a key being rotated out). Sealing always uses the
    /// current key.
    pub fn with_previous(mut self, previous: &[u8; 32]) -> Self {
        let previous = Key::new(previous);
        if previous.fingerprint != self.current.fingerprint {
            self.previous = Some(previous);
        }
        self
    }

    /// The fingerprint of the key that seals.
    pub fn fingerprint(&self) -> &KeyFingerprint {
        &self.current.fingerprint
    }

    /// The fingerprint of the previous key, when one is held.
    pub fn previous_fingerprint(&self) -> Option<&KeyFingerprint> {
        self.previous.as_ref().map(|k| &k.fingerprint)
    }

    /// Whether this cipher opens what the key named `fingerprint` sealed.
    pub fn holds(&self, fingerprint: &KeyFingerprint) -> bool {
        self.current.fingerprint == *fingerprint || self.previous_fingerprint() == Some(fingerprint)
    }

    /// Encrypts one record's value: `nonce || ciphertext || tag`.
    pub fn seal(&self, tenant: &TenantId, key: &RecordKey, plaintext: &[u8]) -> Vec<u8> {
        self.seal_with_ad(&key.associated_data(tenant), plaintext)
    }

    /// Decrypts one record's value sealed by [`Cipher::seal`] for the same tenant and key.
    pub fn open(&self, tenant: &TenantId, key: &RecordKey, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_with_ad(&key.associated_data(tenant), sealed)
    }

    /// Encrypts with caller-chosen associated data (whole-file exports use this).
    pub fn seal_with_ad(&self, ad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let ct = self
            .current
            .aead
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: ad })
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts what [`Cipher::seal_with_ad`] produced with the same associated data.
    pub fn open_with_ad(&self, ad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(CryptoError::Undecryptable);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let payload = || Payload { msg: ct, aad: ad };
        self.current
            .aead
            .decrypt(Nonce::from_slice(nonce), payload())
            .or_else(|e| match &self.previous {
                Some(previous) => previous.aead.decrypt(Nonce::from_slice(nonce), payload()),
                None => Err(e),
            })
            .map_err(|_| CryptoError::Undecryptable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RecordKind;

    fn t(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    #[test]
    fn round_trip_and_binding() {
        let c = Cipher::new(&[7; 32]);
        let k = RecordKey::new(RecordKind::Session, "123@c.us.0");
        let sealed = c.seal(&t("a"), &k, b"secret");
        assert_eq!(c.open(&t("a"), &k, &sealed).unwrap(), b"secret");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        // Moved to another tenant or key: refused.
        assert!(c.open(&t("b"), &k, &sealed).is_err());
        assert!(c.open(&t("a"), &RecordKey::new(RecordKind::Session, "124@c.us.0"), &sealed).is_err());
        assert!(c.open(&t("a"), &RecordKey::new(RecordKind::Identity, "123@c.us.0"), &sealed).is_err());
        // Another key, truncation, bit flips: refused.
        assert!(Cipher::new(&[8; 32]).open(&t("a"), &k, &sealed).is_err());
        assert!(c.open(&t("a"), &k, &sealed[..sealed.len() - 1]).is_err());
        assert!(c.open(&t("a"), &k, &[]).is_err());
        let mut flipped = sealed.clone();
        flipped[14] ^= 1;
        assert!(c.open(&t("a"), &k, &flipped).is_err());
    }

    #[test]
    fn fingerprints_name_keys_and_a_previous_key_still_opens() {
        let (old, new) = ([7u8; 32], [8u8; 32]);
        let fp = KeyFingerprint::of(&old);
        assert_eq!(fp, KeyFingerprint::of(&old));
        assert_ne!(fp, KeyFingerprint::of(&new));
        assert_eq!(KeyFingerprint::parse(fp.as_str()), Some(fp.clone()));
        assert_eq!(KeyFingerprint::parse("not hex at all!!"), None);
        assert!(!fp.as_str().contains("0707"), "the fingerprint is not the key");

        let k = RecordKey::device();
        let sealed_old = Cipher::new(&old).seal(&t("a"), &k, b"v");
        let rotating = Cipher::new(&new).with_previous(&old);
        assert_eq!(rotating.open(&t("a"), &k, &sealed_old).unwrap(), b"v");
        assert_eq!(rotating.fingerprint(), &KeyFingerprint::of(&new));
        assert!(rotating.holds(&fp) && rotating.holds(&KeyFingerprint::of(&new)));
        assert!(!Cipher::new(&new).holds(&fp));
        // Sealing uses the new key only.
        let sealed_new = rotating.seal(&t("a"), &k, b"v");
        assert!(Cipher::new(&old).open(&t("a"), &k, &sealed_new).is_err());
        assert!(!format!("{rotating:?}").contains("[8"));
    }

    #[test]
    fn nonces_differ() {
        let c = Cipher::new(&[7; 32]);
        let k = RecordKey::device();
        assert_ne!(c.seal(&t("a"), &k, b"x"), c.seal(&t("a"), &k, b"x"));
    }

    #[test]
    fn key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let src = LocalKeyFile::new(dir.path().join("keys/data.key"));
        let k1 = src.data_key().unwrap();
        let k2 = src.data_key().unwrap();
        assert_eq!(k1, k2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(src.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(src.path(), b"short").unwrap();
        let err = src.data_key().unwrap_err().to_string();
        assert!(err.contains("32-byte"), "{err}");
    }

    #[test]
    fn an_existing_key_file_is_read_and_a_missing_one_is_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/data.key");
        let err = LocalKeyFile::existing(&path).data_key().unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
        assert!(!path.exists() && !path.parent().unwrap().exists());
        let created = LocalKeyFile::new(&path).data_key().unwrap();
        assert_eq!(LocalKeyFile::existing(&path).data_key().unwrap(), created);
    }

    #[test]
    fn a_base64_key_is_32_bytes_and_its_errors_never_show_it() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let encoded = base64::engine::general_purpose::STANDARD.encode(key);
        assert_eq!(StaticKey::from_base64(&encoded).unwrap().0, key);
        assert_eq!(StaticKey::from_base64(&format!(" {}\n", encoded.trim_end_matches('='))).unwrap().0, key);
        let short = base64::engine::general_purpose::STANDARD.encode([9u8; 16]);
        for bad in [short.as_str(), "not base64 at all!"] {
            let err = StaticKey::from_base64(bad).unwrap_err().to_string();
            assert!(!err.contains(bad), "the error shows the value: {err}");
        }
        assert!(StaticKey::from_base64(&short).unwrap_err().to_string().contains("16 bytes"));
        assert_eq!(format!("{:?}", StaticKey(key)), "StaticKey(<redacted>)");
    }
}
