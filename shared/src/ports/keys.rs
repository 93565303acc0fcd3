//! The data-key port: where the 256-bit key that seals every stored record comes from (a local key file on one
//! machine, a fixed key in tests; a KMS-backed source can implement the same trait).

use crate::crypto::CryptoError;

/// Where the 256-bit data key comes from. Implemented by [`crate::crypto::LocalKeyFile`] and
/// [`crate::crypto::StaticKey`].
pub trait KeySource: Send + Sync {
    /// The data key.
    fn data_key(&self) -> Result<[u8; 32], CryptoError>;
}
