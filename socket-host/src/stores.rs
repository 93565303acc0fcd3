//! The stores a host (and the import command) run on, opened one way from the [`Config`]: the data dir and its
//! data key, the credential store (Firestore or embedded) and the tenant store (DynamoDB or embedded).

use std::path::PathBuf;
use std::sync::Arc;

use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::adapters::{dynamodb, firestore};
use wakeeper_shared::crypto::{Cipher, LocalKeyFile};
use wakeeper_shared::ports::{CredentialStore, TenantStore};

use crate::config::Config;

/// When to connect to Firestore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    /// On first use: a host started during a Firestore outage comes up and retries.
    OnFirstUse,
    /// Now, failing if it cannot (a one-shot command).
    Now,
}

/// Why the stores could not be opened. Never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum StoresError {
    /// The data dir cannot be made private.
    #[error("creating data dir {path}: {source}")]
    DataDir {
        /// The data dir.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The data key cannot be loaded or created.
    #[error("loading the data key: {0}")]
    DataKey(String),
    /// The embedded store cannot be opened (another process may hold it).
    #[error("opening the embedded store ({0}); it is opened by one process at a time: stop the host first")]
    Embedded(String),
    /// Firestore cannot be configured or reached.
    #[error("connecting to Firestore: {0}")]
    Firestore(String),
}

/// The opened stores.
pub struct Stores {
    /// Where every tenant's credential snapshot lives.
    pub credentials: Arc<dyn CredentialStore>,
    /// Where every tenant's status, desire and lease live.
    pub tenants: Arc<dyn TenantStore>,
    /// The data key sealing every stored record.
    pub cipher: Cipher,
}

impl Stores {
    /// Creates the data dir (mode 0700), loads the data key and opens the configured stores; the embedded store
    /// (`<data dir>/store.redb`) serves whichever of the two has no cloud store configured.
    pub async fn from_config(config: &Config, firestore_connect: Connect) -> Result<Self, StoresError> {
        private_dir(&config.data_dir)?;
        let key_file = config.key_file.clone().unwrap_or_else(|| config.data_dir.join("keys").join("data.key"));
        let cipher =
            Cipher::from_source(&LocalKeyFile::new(key_file)).map_err(|e| StoresError::DataKey(e.to_string()))?;
        let embedded = match (&config.firestore_project, &config.dynamodb_table) {
            (Some(_), Some(_)) => None,
            _ => Some(Arc::new(
                EmbeddedStore::open(config.data_dir.join("store.redb"), cipher.clone())
                    .map_err(|e| StoresError::Embedded(e.to_string()))?,
            )),
        };
        let credentials: Arc<dyn CredentialStore> = match &config.firestore_project {
            Some(project) => firestore_store(project, config, &cipher, firestore_connect).await?,
            None => embedded.clone().expect("embedded store opened"),
        };
        let tenants: Arc<dyn TenantStore> = match &config.dynamodb_table {
            Some(table) => {
                let client = match &config.dynamodb_endpoint {
                    Some(url) => dynamodb::dynamo_client_for_endpoint(url),
                    None => aws_sdk_dynamodb::Client::new(&aws_config::load_from_env().await),
                };
                Arc::new(dynamodb::DynamoTenantStore::new(client, table.clone()))
            }
            None => embedded.expect("embedded store opened"),
        };
        Ok(Self { credentials, tenants, cipher })
    }
}

async fn firestore_store(
    project: &str,
    config: &Config,
    cipher: &Cipher,
    connect: Connect,
) -> Result<Arc<dyn CredentialStore>, StoresError> {
    let (project, prefix, cipher) = (project.to_owned(), config.firestore_prefix.clone(), cipher.clone());
    let failed = |e: wakeeper_shared::ports::StoreError| StoresError::Firestore(e.to_string());
    Ok(match connect {
        Connect::OnFirstUse => {
            Arc::new(firestore::LazyFirestoreCredentialStore::new(project, cipher, prefix).map_err(failed)?)
        }
        Connect::Now => {
            Arc::new(firestore::FirestoreCredentialStore::new(project, cipher, prefix).await.map_err(failed)?)
        }
    })
}

fn private_dir(dir: &std::path::Path) -> Result<(), StoresError> {
    let failed = |source| StoresError::DataDir { path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(failed)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
    }
    Ok(())
}
