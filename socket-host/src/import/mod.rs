//! Taking tenants over from a Node + Baileys host without asking anyone to scan a QR code again.
//!
//! - `import baileys --tenant ID --from DIR | --from-firestore COLLECTION/DOC [--dry-run]` converts one tenant's
//!   Baileys auth state ([`baileys`], [`firestore`]) into its credential snapshot and stores it, marked desired.
//! - `import tenants --from-rtdb-export FILE [--dry-run]` imports the tenant list of the Baileys host from a
//!   Realtime Database export ([`rtdb`]).
//!
//! Both write to the stores the host is configured with (the same `--data-dir`, key file, Firestore project and
//! DynamoDB table flags as `serve`). With the embedded store the host must not be running: redb is opened by one
//! process at a time. A Baileys import takes the tenant's lease while it writes, so it is refused while any host
//! runs the tenant.
//!
//! After a takeover the Baileys process must never connect again: if it does, WhatsApp ends one of the two
//! connections with a 440 "replaced" conflict. The snapshot therefore carries a marker record ([`MARKER_KEY`]);
//! [`replaced_reason`] turns it into a reason that says so, for the supervisor's first 440 after the import.

pub mod baileys;
pub mod firestore;
pub mod rtdb;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use wakeeper_shared::adapters::firestore::FirestoreAuth;
use wakeeper_shared::domain::{
    RecordChange, RecordKey, RecordKind, StatusUpdate, TenantId, TenantStatus, UnixMillis, now_millis,
};
use wakeeper_shared::local::LocalCopies;
use wakeeper_shared::ports::{Conflict, StoreError};

pub use baileys::MARKER_KEY;
use baileys::{AuthFiles, BaileysError};

use crate::config::Config;
use crate::stores::{Connect, Stores, StoresError};

/// `socket-host import ...`.
#[derive(Debug, Clone, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process, never moved around")]
pub enum ImportCommand {
    /// Converts one tenant's Baileys auth state into its credential snapshot (no re-scan).
    Baileys(BaileysArgs),
    /// Imports the tenant list (desired flags) from a Firebase Realtime Database JSON export.
    Tenants(TenantsArgs),
}

/// `import baileys`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["from", "from_firestore"])))]
pub struct BaileysArgs {
    /// The tenant the auth state belongs to.
    #[arg(long)]
    pub tenant: String,
    /// A `useMultiFileAuthState` folder.
    #[arg(long, value_name = "DIR")]
    pub from: Option<PathBuf>,
    /// The tenant's auth-state document in Firestore (layouts: see `--firestore-layout`).
    #[arg(long, value_name = "COLLECTION/DOC")]
    pub from_firestore: Option<String>,
    /// Print what would be imported; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Overwrite credentials the tenant already has in wakeeper.
    #[arg(long)]
    pub replace_existing: bool,
    /// How the files sit in Firestore: `documents` (one document per file in a sub-collection of the tenant's
    /// document), `map` (one field per file in the tenant's document), or `auto`.
    #[arg(long, value_enum, default_value = "auto")]
    pub firestore_layout: firestore::Layout,
    /// Sub-collection holding one document per file (documents layout).
    #[arg(long, default_value = "auth", value_name = "NAME")]
    pub firestore_files: String,
    /// Map field holding the files (map layout); default: the document's top-level fields.
    #[arg(long, value_name = "FIELD")]
    pub firestore_map_field: Option<String>,
    /// Field holding a file's JSON text, when files are stored as text.
    #[arg(long, default_value = "value", value_name = "FIELD")]
    pub firestore_value_field: String,
    /// Project of the Baileys data (default: the credential store's project, then `GOOGLE_CLOUD_PROJECT`).
    #[arg(long, env = "WAKEEPER_IMPORT_FIRESTORE_PROJECT")]
    pub firestore_source_project: Option<String>,
    /// OAuth access token for Firestore (instead of a key or Application Default Credentials).
    #[arg(long, env = "WAKEEPER_IMPORT_FIRESTORE_TOKEN", hide_env_values = true)]
    pub firestore_token: Option<String>,
    /// The old system's service account key file (JSON; mode 0600). Default: the key text in
    /// WAKEEPER_IMPORT_FIRESTORE_CREDENTIALS, then the host's WAKEEPER_FIRESTORE_CREDENTIALS, then Application
    /// Default Credentials.
    #[arg(long, env = "WAKEEPER_IMPORT_FIRESTORE_CREDENTIALS_FILE", value_name = "FILE")]
    pub firestore_credentials_file: Option<PathBuf>,
    /// The old system's service account key itself (the key file's text).
    #[arg(long, env = "WAKEEPER_IMPORT_FIRESTORE_CREDENTIALS", hide_env_values = true, value_name = "JSON")]
    pub firestore_credentials: Option<String>,
}

/// How `--from-firestore` authenticates: a key file, a key in a variable (the import's, then the host's), else
/// Application Default Credentials.
fn import_auth(config: &Config, args: &BaileysArgs) -> Result<FirestoreAuth, ImportError> {
    let bad = |e: StoreError| ImportError::Config(e.to_string());
    if let Some(path) = &args.firestore_credentials_file {
        let raw = wakeeper_shared::private_files::read_secret_file(path)
            .map_err(|e| ImportError::Config(e.to_string()))?
            .ok_or_else(|| ImportError::Config(format!("{} does not exist", path.display())))?;
        let text =
            String::from_utf8(raw).map_err(|_| ImportError::Config(format!("{} is not text", path.display())))?;
        return FirestoreAuth::service_account_json(&text, &path.display().to_string()).map_err(bad);
    }
    let given = [
        (args.firestore_credentials.as_deref(), "WAKEEPER_IMPORT_FIRESTORE_CREDENTIALS"),
        (config.firestore_credentials.as_deref(), "WAKEEPER_FIRESTORE_CREDENTIALS"),
    ];
    match given.into_iter().find_map(|(text, var)| text.filter(|t| !t.trim().is_empty()).map(|t| (t, var))) {
        Some((text, var)) => FirestoreAuth::service_account_json(text, var).map_err(bad),
        None => Ok(FirestoreAuth::Default),
    }
}

/// `import tenants`.
#[derive(Debug, Clone, Args)]
pub struct TenantsArgs {
    /// The Realtime Database JSON export (whole database or the `tenants` node).
    #[arg(long, value_name = "FILE")]
    pub from_rtdb_export: PathBuf,
    /// Print what would be imported; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Why an import was refused or failed. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The tenant id is not valid.
    #[error("invalid tenant id: {0}")]
    TenantId(#[from] wakeeper_shared::domain::TenantIdError),
    /// The Baileys auth state was refused.
    #[error("baileys auth state refused, nothing written: {0}")]
    Baileys(#[from] BaileysError),
    /// The tenant list was refused.
    #[error("tenant list refused, nothing written: {0}")]
    Rtdb(#[from] rtdb::RtdbError),
    /// The tenant already has credentials in wakeeper.
    #[error("tenant {0} already has stored credentials; nothing written (pass --replace-existing to overwrite them)")]
    Exists(String),
    /// A host runs the tenant right now.
    #[error("tenant {tenant} is held by host {owner}; stop it there first (nothing written)")]
    Running {
        /// The tenant.
        tenant: String,
        /// The lease holder.
        owner: String,
    },
    /// A store failed or refused.
    #[error("store: {0}")]
    Store(String),
    /// The configuration does not allow the import.
    #[error("configuration: {0}")]
    Config(String),
    /// Writing the report failed.
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
}

fn store_err(what: &str) -> impl FnOnce(StoreError) -> ImportError + '_ {
    move |e| ImportError::Store(format!("{what}: {e}"))
}

/// The takeover marker stored in an imported snapshot (`other/import/baileys`). No secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportMarker {
    /// Where the state came from (`baileys`).
    pub source: String,
    /// Folder or Firestore.
    pub origin: String,
    /// When the import ran.
    pub imported_at: UnixMillis,
}

/// The marker's record key.
pub fn marker_key() -> RecordKey {
    RecordKey::new(RecordKind::Other, MARKER_KEY)
}

/// The change that removes the marker, for the supervisor to commit once the marker has served (after the first
/// 440 that quoted it), so a later conflict is not blamed on the old Baileys host.
pub fn marker_removal() -> RecordChange {
    RecordChange { key: marker_key(), value: None }
}

/// The reason to record for a 440 "replaced" when the tenant's snapshot still carries the takeover marker:
/// `marker` is the value of [`marker_key`] (`None` when absent). `None` means "no marker: use the usual reason".
pub fn replaced_reason(marker: Option<&[u8]>) -> Option<String> {
    let raw = marker?;
    let when = serde_json::from_slice::<ImportMarker>(raw)
        .ok()
        .and_then(|m| whatsapp_rust::chrono::DateTime::from_timestamp_millis(m.imported_at))
        .map(|t| format!(" on {}", t.format("%Y-%m-%d %H:%M UTC")))
        .unwrap_or_default();
    Some(format!(
        "replaced (440 conflict) after the takeover from Baileys{when}: the old Baileys host probably still runs this \
         number. Stop it for good (and delete its auth state), then reconnect the tenant"
    ))
}

/// The takeover marker in the tenant's local working copy, if any. Blocking (reads and decrypts
/// the copy; run it in `spawn_blocking`). Safe next to an open engine store: it only reads, and a torn journal
/// tail is skipped. For a supervisor that has no engine call to read `other` records with.
pub fn read_marker(local: &LocalCopies, tenant: &TenantId) -> Option<Vec<u8>> {
    local.open(tenant).ok()?.load().ok().flatten()?.records.remove(&marker_key())
}

/// Runs an import sub-command, writing its report to `out`.
pub async fn run(config: &Config, cmd: &ImportCommand, out: &mut dyn Write) -> Result<(), ImportError> {
    match cmd {
        ImportCommand::Baileys(args) => import_baileys(config, args, out).await,
        ImportCommand::Tenants(args) => import_tenants(config, args, out).await,
    }
}

/// The stores `serve` would use, opened the same way.
async fn open_stores(config: &Config) -> Result<Stores, ImportError> {
    Stores::from_config(config, Connect::Now).await.map_err(|e| match e {
        StoresError::DataDir { .. }
        | StoresError::DataDirNotOurs { .. }
        | StoresError::DataKey(_)
        | StoresError::NoDataKey
        | StoresError::TwoDataKeys => ImportError::Config(e.to_string()),
        StoresError::Embedded(_) | StoresError::Firestore(_) => ImportError::Store(e.to_string()),
    })
}

/// Lease owner name of an import, so a host's logs say who held the tenant.
fn import_owner() -> String {
    format!("import-{}", std::process::id())
}

const IMPORT_LEASE_MS: u64 = 120_000;

async fn import_baileys(config: &Config, args: &BaileysArgs, out: &mut dyn Write) -> Result<(), ImportError> {
    let tenant = TenantId::parse(&args.tenant)?;
    let (files, origin) = match (&args.from, &args.from_firestore) {
        (Some(dir), None) => (AuthFiles::read_dir(dir)?, "folder"),
        (None, Some(doc)) => {
            let project = args
                .firestore_source_project
                .clone()
                .or_else(|| config.firestore_project.clone())
                .or_else(|| std::env::var("GOOGLE_CLOUD_PROJECT").ok())
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    ImportError::Config("--from-firestore needs a project: --firestore-source-project".into())
                })?;
            let source = firestore::FirestoreSource {
                project,
                document: doc.clone(),
                layout: args.firestore_layout,
                files_collection: args.firestore_files.clone(),
                map_field: args.firestore_map_field.clone(),
                value_field: args.firestore_value_field.clone(),
                token: args.firestore_token.clone(),
                auth: import_auth(config, args)?,
            };
            (firestore::read(&source).await?, "firestore")
        }
        _ => return Err(ImportError::Config("pass exactly one of --from and --from-firestore".into())),
    };
    let converted = baileys::convert(&tenant, &files)?;
    let mut snapshot = converted.snapshot;
    snapshot
        .check_restorable()
        .map_err(|e| ImportError::Baileys(BaileysError::Source(format!("converted state is not restorable: {e}"))))?;
    let marker = ImportMarker { source: "baileys".into(), origin: origin.into(), imported_at: now_millis() };
    snapshot.records.insert(marker_key(), serde_json::to_vec(&marker).expect("marker serializes"));

    writeln!(out, "tenant {tenant}: Baileys auth state from {origin} ({} files)", files.len())?;
    writeln!(out, "  device {} (noise key {})", converted.jid, hex(&converted.noise_public))?;
    write!(out, "{}", converted.report)?;
    if args.dry_run {
        writeln!(out, "dry run: nothing written")?;
        return Ok(());
    }

    let stores = open_stores(config).await?;
    if stores.credentials.generation(&tenant).await.map_err(store_err("reading"))?.is_some() && !args.replace_existing {
        return Err(ImportError::Exists(tenant.to_string()));
    }
    let lease = match stores.tenants.acquire_lease(&tenant, &import_owner(), None, IMPORT_LEASE_MS, now_millis()).await
    {
        Ok(l) => l,
        Err(StoreError::Conflict(Conflict::LeaseHeld { holder })) => {
            return Err(ImportError::Running { tenant: tenant.to_string(), owner: holder.owner });
        }
        Err(e) => return Err(store_err("taking the lease")(e)),
    };
    let result = write_snapshot(config, &stores, &tenant, &mut snapshot, lease.epoch).await;
    if let Err(e) = stores.tenants.release_lease(&tenant, &lease).await {
        tracing::warn!(tenant = %tenant, error = %e, "releasing the import lease failed; it expires on its own");
    }
    let generation = result?;
    writeln!(
        out,
        "imported: {} records at generation {generation}; tenant marked desired. Stop the Baileys host for this \
         number now: if it connects again, WhatsApp drops one of the two (440 replaced).",
        snapshot.records.len()
    )?;
    Ok(())
}

async fn write_snapshot(
    config: &Config,
    stores: &Stores,
    tenant: &TenantId,
    snapshot: &mut wakeeper_shared::domain::CredentialSnapshot,
    epoch: u64,
) -> Result<u64, ImportError> {
    // Above both the stored generation and this machine's working copy, so neither the start-up rule (a newer
    // local copy is pushed up) nor a stale replica can bring the old state back over the import.
    let stored = stores.credentials.generation(tenant).await.map_err(store_err("reading"))?.unwrap_or(0);
    let local = {
        let local = LocalCopies::new(config.data_dir.clone(), stores.cipher.clone());
        local.with_copy(tenant, |copy| Ok(copy.generation())).await.ok().flatten().unwrap_or(0)
    };
    snapshot.generation = stored.max(local) + 1;
    stores.credentials.replace(tenant, snapshot, epoch).await.map_err(store_err("writing the snapshot"))?;
    let back = stores.credentials.read(tenant).await.map_err(store_err("reading the snapshot back"))?;
    if back.records.len() != snapshot.records.len() || back.check_restorable().is_err() {
        return Err(ImportError::Store("the stored snapshot does not read back whole".into()));
    }
    stores.tenants.set_desired(tenant, true).await.map_err(store_err("marking the tenant desired"))?;
    let update = StatusUpdate {
        status: TenantStatus::Connecting,
        reason: Some("imported from Baileys; waiting for a host to connect it".into()),
        whatsapp_connected: true,
    };
    stores.tenants.write_status(tenant, &update, now_millis()).await.map_err(store_err("writing the status"))?;
    Ok(snapshot.generation)
}

async fn import_tenants(config: &Config, args: &TenantsArgs, out: &mut dyn Write) -> Result<(), ImportError> {
    let list = rtdb::read_export(&args.from_rtdb_export)?;
    writeln!(out, "tenant list from {}", args.from_rtdb_export.display())?;
    write!(out, "{list}")?;
    if args.dry_run {
        writeln!(out, "dry run: nothing written")?;
        return Ok(());
    }
    let stores = open_stores(config).await?;
    for entry in &list.tenants {
        stores.tenants.set_desired(&entry.id, entry.desired).await.map_err(store_err("writing a tenant"))?;
    }
    writeln!(out, "imported: {} tenants, {} skipped", list.tenants.len(), list.skipped.len())?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use wakeeper_shared::crypto::Cipher;
    use wakeeper_shared::local::WorkingCopy;

    use super::*;

    #[test]
    fn replaced_reason_only_with_a_marker() {
        assert_eq!(replaced_reason(None), None);
        let marker = ImportMarker { source: "baileys".into(), origin: "folder".into(), imported_at: 1_795_000_000_000 };
        let reason = replaced_reason(Some(&serde_json::to_vec(&marker).unwrap())).unwrap();
        assert!(reason.contains("440") && reason.contains("Baileys host probably still runs"), "{reason}");
        assert!(reason.contains("2026-"), "{reason}");
        // A damaged marker still says it, without the date.
        assert!(replaced_reason(Some(b"garbage")).unwrap().contains("Baileys"));
        assert_eq!(marker_removal().value, None);
        assert_eq!(marker_removal().key, marker_key());
    }

    #[test]
    fn the_marker_is_read_from_the_working_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (tenant, cipher) = (TenantId::parse("t1").unwrap(), Cipher::new(&[3; 32]));
        let local = LocalCopies::new(dir.path(), cipher.clone());
        assert_eq!(read_marker(&local, &tenant), None, "no working copy");
        let mut snapshot = wakeeper_shared::domain::CredentialSnapshot { generation: 4, ..Default::default() };
        snapshot.records.insert(RecordKey::new(RecordKind::Session, "a@c.us.0"), vec![1]);
        let mut wc = WorkingCopy::open(dir.path(), tenant.clone(), cipher.clone()).unwrap();
        wc.write_base(&snapshot).unwrap();
        assert_eq!(read_marker(&local, &tenant), None, "no marker");
        wc.append(&[RecordChange { key: marker_key(), value: Some(b"{}".to_vec()) }]).unwrap();
        assert_eq!(read_marker(&local, &tenant), Some(b"{}".to_vec()));
        wc.append(&[marker_removal()]).unwrap();
        assert_eq!(read_marker(&local, &tenant), None, "removed");
    }
}
