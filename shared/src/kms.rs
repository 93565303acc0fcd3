//! A data key wrapped by AWS KMS (`WAKEEPER_DATA_KEY_KMS`): the key is kept only as KMS ciphertext, in a
//! variable or the platform's secrets, and unwrapped with `Decrypt` once at start. Whoever reads the variable
//! learns nothing without the KMS key's permission, and revoking that permission revokes the data key.
//!
//! Make one: `aws kms generate-data-key --key-id <key> --key-spec AES_256 --query CiphertextBlob --output text`
//! (base64 of the wrapped key, which is what the variable holds).

use aws_sdk_kms::error::DisplayErrorContext;
use aws_sdk_kms::primitives::Blob;
use base64::Engine;

use crate::crypto::{CryptoError, StaticKey};

/// Unwraps `wrapped` (base64 of a KMS ciphertext blob holding the 32-byte data key) with KMS, at `endpoint`
/// when given (a local server in tests), else wherever the AWS configuration of the environment points, with
/// `timeouts` on the call.
/// Errors name what failed, never the key.
pub async fn unwrap_data_key(
    wrapped: &str,
    endpoint: Option<&str>,
    timeouts: &crate::aws::AwsTimeouts,
) -> Result<StaticKey, CryptoError> {
    let unavailable = |why: String| CryptoError::KeyUnavailable(format!("WAKEEPER_DATA_KEY_KMS: {why}"));
    let blob = base64::engine::general_purpose::STANDARD
        .decode(wrapped.trim())
        .map_err(|_| unavailable("not valid base64 of a KMS ciphertext".into()))?;
    let client = aws_sdk_kms::Client::new(&crate::aws::sdk_config(timeouts, endpoint).await);
    let answer = client
        .decrypt()
        .ciphertext_blob(Blob::new(blob))
        .send()
        .await
        .map_err(|e| unavailable(format!("KMS Decrypt failed: {}", DisplayErrorContext(e))))?;
    let plaintext = answer.plaintext().ok_or_else(|| unavailable("KMS answered no plaintext".into()))?;
    let len = plaintext.as_ref().len();
    let key: [u8; 32] = plaintext
        .as_ref()
        .try_into()
        .map_err(|_| unavailable(format!("the unwrapped key is {len} bytes, not 32 (use --key-spec AES_256)")))?;
    Ok(StaticKey(key))
}
