//! Encryption of every stored record: AES-256-GCM, a random 96-bit nonce per record, and the tenant id,
//! record kind and record key as associated data, so a record copied to another tenant or key does not
//! decrypt. The data key comes from a [`KeySource`]: a local key file on one machine (created 0600 on
//! first use); a KMS-backed source can implement the same trait.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

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

/// A data key kept in a local file (32 raw bytes, mode 0600), created on first use. Read like an OpenSSH key:
/// a symlink, or a file group or others may read, is refused.
pub struct LocalKeyFile {
    path: PathBuf,
}

impl LocalKeyFile {
    /// A key file at `path` (created by [`KeySource::data_key`] when absent).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
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

/// A fixed key, for tests and for keys obtained elsewhere (e.g. decrypted by KMS at start-up).
pub struct StaticKey(pub [u8; 32]);

impl KeySource for StaticKey {
    fn data_key(&self) -> Result<[u8; 32], CryptoError> {
        Ok(self.0)
    }
}

/// Seals and opens records with one data key.
#[derive(Clone)]
pub struct Cipher {
    aead: Aes256Gcm,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(..)")
    }
}

impl Cipher {
    /// A cipher over the key from `source`.
    pub fn from_source(source: &dyn KeySource) -> Result<Self, CryptoError> {
        Ok(Self::new(&source.data_key()?))
    }

    /// A cipher over `key`.
    pub fn new(key: &[u8; 32]) -> Self {
        Self { aead: Aes256Gcm::new(key.into()) }
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
        self.aead
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: ad })
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
}
