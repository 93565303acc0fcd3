//! How the Firestore client authenticates: Application Default Credentials, or a service account's JSON key
//! given as text (`WAKEEPER_FIRESTORE_CREDENTIALS`), for platforms whose secrets are variables and whose
//! containers have no metadata server (Railway, Fly.io).

use std::fmt;
use std::sync::Arc;

use firestore::gcloud_sdk::{GCP_DEFAULT_SCOPES, GoogleAuthHeaders};
use firestore::{FirestoreDb, FirestoreDbOptions};
use serde_json::Value;

use crate::ports::StoreError;

/// How the Firestore client authenticates. Its `Debug` never shows a key.
#[derive(Clone, Default)]
pub enum FirestoreAuth {
    /// Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's login, the metadata server);
    /// the emulator's stub token when `FIRESTORE_EMULATOR_HOST` is set.
    #[default]
    Default,
    /// A service account's JSON key.
    ServiceAccountKey(Arc<Value>),
}

impl fmt::Debug for FirestoreAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Default => f.write_str("Default"),
            Self::ServiceAccountKey(key) => {
                let email = key.get("client_email").and_then(Value::as_str).unwrap_or("?");
                write!(f, "ServiceAccountKey({email})")
            }
        }
    }
}

impl FirestoreAuth {
    /// A service account key from its JSON text, checked for the fields a key has. `source` names where the
    /// text came from (a variable or a file) in the error, which never quotes the text.
    pub fn service_account_json(text: &str, source: &str) -> Result<Self, StoreError> {
        let invalid = |why: &str| StoreError::Invalid(format!("{source}: {why}"));
        let key: Value = serde_json::from_str(text.trim())
            .map_err(|e| invalid(&format!("not JSON (line {}, column {})", e.line(), e.column())))?;
        if key.get("type").and_then(Value::as_str) != Some("service_account") {
            return Err(invalid("not a service account key (its `type` is not `service_account`)"));
        }
        for field in ["client_email", "private_key", "project_id"] {
            if key.get(field).and_then(Value::as_str).is_none_or(str::is_empty) {
                return Err(invalid(&format!("the service account key has no `{field}`")));
            }
        }
        Ok(Self::ServiceAccountKey(Arc::new(key)))
    }

    /// An `Authorization` header value for Firestore's REST API: a bearer token of the key, or of Application
    /// Default Credentials (which include the metadata server). Never logged.
    pub async fn authorization(&self) -> Result<String, StoreError> {
        crate::tls::install_crypto_provider();
        let failed = |e: &dyn fmt::Display| StoreError::Unavailable(format!("google credentials: {e}"));
        let headers = match self {
            Self::Default => GoogleAuthHeaders::from_adc_with_scopes(GCP_DEFAULT_SCOPES.clone()).await,
            Self::ServiceAccountKey(key) => {
                GoogleAuthHeaders::from_service_account_key(key.as_ref().clone(), GCP_DEFAULT_SCOPES.clone()).await
            }
        }
        .map_err(|e| failed(&e))?;
        let map = headers.headers().await.map_err(|e| failed(&e))?;
        let value = map.get("authorization").and_then(|v| v.to_str().ok());
        value.map(str::to_owned).ok_or_else(|| failed(&"no authorization header"))
    }

    /// A client for `options`. The emulator (`FIRESTORE_EMULATOR_HOST`) takes no real credentials, so a key is
    /// not used there.
    pub(super) async fn connect(&self, options: FirestoreDbOptions) -> Result<FirestoreDb, StoreError> {
        let failed = |e: &dyn fmt::Display| StoreError::Unavailable(format!("connecting to firestore: {e}"));
        match self {
            Self::ServiceAccountKey(key) if std::env::var_os("FIRESTORE_EMULATOR_HOST").is_none() => {
                let auth =
                    GoogleAuthHeaders::from_service_account_key(key.as_ref().clone(), GCP_DEFAULT_SCOPES.clone())
                        .await
                        .map_err(|e| failed(&e))?;
                FirestoreDb::with_options_auth(options, auth).await.map_err(|e| failed(&e))
            }
            _ => FirestoreDb::with_options(options).await.map_err(|e| failed(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = r#"{"type": "service_account", "project_id": "p", "client_email": "host@p.iam.gserviceaccount.com",
        "private_key": "-----BEGIN PRIVATE KEY-----\ns3cret\n-----END PRIVATE KEY-----\n", "private_key_id": "k1"}"#;

    #[test]
    fn a_service_account_key_is_read_and_never_shown() {
        let auth = FirestoreAuth::service_account_json(KEY, "WAKEEPER_FIRESTORE_CREDENTIALS").unwrap();
        let shown = format!("{auth:?}");
        assert_eq!(shown, "ServiceAccountKey(host@p.iam.gserviceaccount.com)");
    }

    #[test]
    fn what_is_not_a_service_account_key_is_refused_naming_the_source_not_the_text() {
        let user = KEY.replace("service_account", "authorized_user");
        let no_key = KEY.replace("private_key\"", "privat\"");
        for (text, why) in [
            ("s3cret{", "not JSON"),
            (user.as_str(), "not a service account key"),
            (no_key.as_str(), "no `private_key`"),
        ] {
            let e = FirestoreAuth::service_account_json(text, "WAKEEPER_FIRESTORE_CREDENTIALS").unwrap_err();
            let e = e.to_string();
            assert!(e.contains("WAKEEPER_FIRESTORE_CREDENTIALS") && e.contains(why), "{e}");
            assert!(!e.contains("s3cret"), "the error quotes the text: {e}");
        }
    }

    #[tokio::test]
    async fn a_key_builds_credentials_without_a_request() {
        crate::tls::install_crypto_provider();
        let Ok(FirestoreAuth::ServiceAccountKey(key)) = FirestoreAuth::service_account_json(KEY, "test") else {
            panic!("the key parses")
        };
        GoogleAuthHeaders::from_service_account_key(key.as_ref().clone(), GCP_DEFAULT_SCOPES.clone())
            .await
            .expect("credentials are built; the key itself is parsed at the first token request");
    }
}
