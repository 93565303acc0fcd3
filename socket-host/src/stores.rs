//! The stores a host (and the import command) run on, opened one way from the [`Config`]: the data dir and its
//! data key, the credential store (Firestore or embedded) and the tenant store (DynamoDB or embedded).

use std::path::PathBuf;
use std::sync::Arc;

use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::adapters::{dynamodb, firestore};
use wakeeper_shared::crypto::{Cipher, KeySource, LocalKeyFile};
use wakeeper_shared::disk::DiskWatch;
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
    /// The data dir belongs to another user (a volume mounted root-owned), so it cannot be made private.
    #[error(
        "the data dir {path} is owned by uid {owner} and this process runs as uid {me}: start the container as \
         the image does (its entrypoint runs as root, takes ownership of the volume and then runs the host as \
         uid 10001; on Railway leave RAILWAY_RUN_UID unset), or give the directory to uid {me} \
         (`chown -R {me}:{me} {path}`)"
    )]
    DataDirNotOurs {
        /// The data dir.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's uid.
        me: u32,
    },
    /// The data key cannot be loaded or created.
    #[error("loading the data key: {0}")]
    DataKey(String),
    /// No data key source was given where the host may not generate one.
    #[error(
        "no data key given: with a Firestore credential store set WAKEEPER_DATA_KEY (base64 of the 32-byte key), \
         WAKEEPER_KEY_FILE (a file holding it) or WAKEEPER_DATA_KEY_KMS (the key wrapped by AWS KMS). A generated key could not open the snapshots already stored, so \
         the host never makes one there"
    )]
    NoDataKey,
    /// Both key sources were given.
    #[error("more than one of WAKEEPER_DATA_KEY, WAKEEPER_KEY_FILE and WAKEEPER_DATA_KEY_KMS is set: set one")]
    TwoDataKeys,
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
        Self::from_config_watched(config, firestore_connect, DiskWatch::new()).await
    }

    /// [`Stores::from_config`], the embedded store reporting its failed reads and commits to `disk` (and
    /// reopened in place from there once the disk takes writes again).
    pub async fn from_config_watched(
        config: &Config,
        firestore_connect: Connect,
        disk: DiskWatch,
    ) -> Result<Self, StoresError> {
        private_dir(&config.data_dir)?;
        let cipher = load_cipher(config).await?;
        let embedded = match (&config.firestore_project, &config.dynamodb_table) {
            (Some(_), Some(_)) => None,
            _ => Some(Arc::new(
                EmbeddedStore::open_watched(config.data_dir.join("store.redb"), cipher.clone(), disk)
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
                    None => aws_sdk_dynamodb::Client::new(
                        &wakeeper_shared::aws::sdk_config(&config.aws_timeouts, None).await,
                    ),
                };
                Arc::new(dynamodb::DynamoTenantStore::new(client, table.clone()))
            }
            None => embedded.expect("embedded store opened"),
        };
        Ok(Self { credentials, tenants, cipher })
    }
}

/// The cipher of the configured data key (and of the previous key while rotating). Logs where the key came from
/// and its fingerprint, never the key.
pub(crate) async fn load_cipher(config: &Config) -> Result<Cipher, StoresError> {
    let (source, from) = match &config.data_key_kms {
        Some(_) if config.data_key.is_some() || config.key_file.is_some() => return Err(StoresError::TwoDataKeys),
        Some(wrapped) => {
            let key =
                wakeeper_shared::kms::unwrap_data_key(wrapped, config.kms_endpoint.as_deref(), &config.aws_timeouts)
                    .await
                    .map_err(|e| StoresError::DataKey(e.to_string()))?;
            (Box::new(key) as Box<dyn KeySource>, "WAKEEPER_DATA_KEY_KMS".to_string())
        }
        None => key_source(config)?,
    };
    let mut cipher = Cipher::from_source(source.as_ref()).map_err(|e| StoresError::DataKey(e.to_string()))?;
    if let Some(previous) = &config.data_key_previous {
        let previous = previous.data_key().map_err(|e| StoresError::DataKey(e.to_string()))?;
        cipher = cipher.with_previous(&previous);
    }
    tracing::info!(
        source = %from,
        fingerprint = %cipher.fingerprint(),
        previous = ?cipher.previous_fingerprint().map(|f| f.to_string()),
        "data key loaded"
    );
    Ok(cipher)
}

/// Where the data key comes from, and how to name that source in the log (never the key). A key is generated
/// only for the embedded credential store, whose records live beside it; with Firestore the records outlive
/// the container's disk, and a key generated on a wiped disk would make every stored snapshot unreadable (and
/// every tenant look corrupt), so the key must be given.
fn key_source(config: &Config) -> Result<(Box<dyn KeySource>, String), StoresError> {
    let cloud = config.firestore_project.is_some();
    match (&config.data_key, &config.key_file) {
        (Some(_), Some(_)) => Err(StoresError::TwoDataKeys),
        (Some(key), None) => Ok((Box::new(key.clone()), "WAKEEPER_DATA_KEY".into())),
        (None, Some(path)) if cloud => Ok((Box::new(LocalKeyFile::existing(path)), path.display().to_string())),
        (None, Some(path)) => Ok((Box::new(LocalKeyFile::new(path)), path.display().to_string())),
        (None, None) if cloud => Err(StoresError::NoDataKey),
        (None, None) => {
            let path = config.data_dir.join("keys").join("data.key");
            let from = path.display().to_string();
            Ok((Box::new(LocalKeyFile::new(path)), from))
        }
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
    let auth = match &config.firestore_credentials {
        Some(json) => {
            firestore::FirestoreAuth::service_account_json(json, "WAKEEPER_FIRESTORE_CREDENTIALS").map_err(failed)?
        }
        None => firestore::FirestoreAuth::Default,
    };
    tracing::info!(project = %project, auth = ?auth, "firestore credential store");
    Ok(match connect {
        Connect::OnFirstUse => Arc::new(
            firestore::LazyFirestoreCredentialStore::new(project, cipher, prefix).map_err(failed)?.with_auth(auth),
        ),
        Connect::Now => Arc::new(
            firestore::FirestoreCredentialStore::new_with(project, &auth, cipher, prefix).await.map_err(failed)?,
        ),
    })
}

fn private_dir(dir: &std::path::Path) -> Result<(), StoresError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let failed = |source| StoresError::DataDir { path: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
        // A volume the platform mounted root-owned: say whose it is and what to do, not just EPERM.
        let owner = std::fs::metadata(dir).map(|m| m.uid()).ok();
        let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
        match (e.kind(), owner, me) {
            (std::io::ErrorKind::PermissionDenied, Some(owner), Some(me)) if owner != me => {
                StoresError::DataDirNotOurs { path: dir.to_owned(), owner, me }
            }
            _ => failed(e),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(dir: &std::path::Path, pairs: &[(&str, String)]) -> Config {
        let mut map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        map.insert("WAKEEPER_DATA_DIR".into(), dir.join("data").display().to_string());
        Config::from_lookup(|var| map.get(var).cloned()).unwrap()
    }

    fn key_of(config: &Config) -> Result<[u8; 32], String> {
        let (source, _) = key_source(config).map_err(|e| e.to_string())?;
        source.data_key().map_err(|e| e.to_string())
    }

    const KEY_B64: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

    #[test]
    fn the_embedded_default_generates_its_key_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), &[]);
        let key = key_of(&c).unwrap();
        assert_eq!(std::fs::read(dir.path().join("data/keys/data.key")).unwrap(), key);
    }

    #[test]
    fn with_firestore_and_no_key_the_host_refuses_and_generates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), &[("WAKEEPER_FIRESTORE_PROJECT", "p".into())]);
        let err = key_of(&c).unwrap_err();
        assert!(err.contains("WAKEEPER_DATA_KEY") && err.contains("WAKEEPER_KEY_FILE"), "{err}");
        assert!(!dir.path().join("data/keys").exists());
    }

    #[test]
    fn with_firestore_a_named_key_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets/data.key");
        let c = config(
            dir.path(),
            &[("WAKEEPER_FIRESTORE_PROJECT", "p".into()), ("WAKEEPER_KEY_FILE", path.display().to_string())],
        );
        assert!(key_of(&c).unwrap_err().contains("does not exist"));
        assert!(!path.exists());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Private, as a key file must be (main refuses group- or world-readable ones).
        let mut opts = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(opts.write(true).create_new(true), 0o600);
        std::io::Write::write_all(&mut opts.open(&path).unwrap(), &[7u8; 32]).unwrap();
        assert_eq!(key_of(&c).unwrap(), [7u8; 32]);
    }

    #[test]
    fn with_firestore_the_key_may_come_from_a_variable() {
        let dir = tempfile::tempdir().unwrap();
        let c =
            config(dir.path(), &[("WAKEEPER_FIRESTORE_PROJECT", "p".into()), ("WAKEEPER_DATA_KEY", KEY_B64.into())]);
        assert_eq!(key_of(&c).unwrap(), [7u8; 32]);
        let (_, from) = key_source(&c).unwrap();
        assert_eq!(from, "WAKEEPER_DATA_KEY");
        assert!(!dir.path().join("data/keys").exists());
    }

    #[test]
    fn two_key_sources_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path(), &[("WAKEEPER_DATA_KEY", KEY_B64.into()), ("WAKEEPER_KEY_FILE", "/k".into())]);
        assert!(key_of(&c).unwrap_err().contains("set one"));
    }
}
