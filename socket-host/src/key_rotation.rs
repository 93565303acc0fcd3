//! `socket-host keys`: the data key's fingerprint, and re-sealing every stored record under a new key while
//! hosts run.
//!
//! Rotation, step by step (README, "Rotating the data key"): give every host the new key as `WAKEEPER_DATA_KEY`
//! and the old one as `WAKEEPER_DATA_KEY_PREVIOUS` (they read both, seal with the new one), run
//! `socket-host keys rotate` with the same two variables, then drop `WAKEEPER_DATA_KEY_PREVIOUS`.

use std::io::Write;

use futures_util::StreamExt;
use serde::Serialize;
use wakeeper_shared::adapters::firestore::{FirestoreCredentialStore, Resealed};
use wakeeper_shared::ports::CredentialStore;

use crate::config::Config;

/// What `keys` does.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Print the fingerprint of the data key (and of the previous key, when one is set). Never the key.
    Fingerprint,
    /// Re-seal every tenant's records in the Firestore credential store under WAKEEPER_DATA_KEY, reading what
    /// WAKEEPER_DATA_KEY_PREVIOUS sealed. Safe while hosts run: a tenant written meanwhile is read again.
    Rotate {
        /// Tenants re-sealed at once.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
}

/// What `keys rotate` did (printed as JSON).
#[derive(Debug, Default, Serialize)]
pub struct RotateReport {
    /// The key everything is sealed with now.
    pub fingerprint: String,
    /// Tenants whose records were re-sealed.
    pub resealed: usize,
    /// Records re-sealed, over all tenants.
    pub records: usize,
    /// Tenants that already were.
    pub already_current: usize,
    /// Tenants that kept being written while this ran (run it again).
    pub lost_races: Vec<String>,
    /// Tenants that failed, with why (never a secret).
    pub failed: Vec<(String, String)>,
}

/// Runs `command`, writing its answer to `out`. `Err` when a rotation left any tenant behind.
pub async fn run(config: &Config, command: &KeysCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    let cipher = crate::stores::load_cipher(config).await?;
    match command {
        KeysCommand::Fingerprint => {
            writeln!(out, "current {}", cipher.fingerprint())?;
            if let Some(previous) = cipher.previous_fingerprint() {
                writeln!(out, "previous {previous}")?;
            }
            Ok(())
        }
        KeysCommand::Rotate { concurrency } => {
            let Some(project) = &config.firestore_project else {
                anyhow::bail!(
                    "keys rotate re-seals the Firestore credential store (set WAKEEPER_FIRESTORE_PROJECT); the \
                     embedded store's key lives beside it"
                );
            };
            anyhow::ensure!(
                config.data_key_previous.is_some(),
                "keys rotate needs the old key as WAKEEPER_DATA_KEY_PREVIOUS and the new one as WAKEEPER_DATA_KEY"
            );
            let store = FirestoreCredentialStore::new(project.clone(), cipher.clone(), config.firestore_prefix.clone())
                .await
                .map_err(|e| anyhow::anyhow!("connecting to Firestore: {e}"))?;
            let report = rotate(&store, *concurrency).await?;
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
            anyhow::ensure!(
                report.lost_races.is_empty() && report.failed.is_empty(),
                "{} tenant(s) were not re-sealed; run keys rotate again",
                report.lost_races.len() + report.failed.len()
            );
            Ok(())
        }
    }
}

/// Re-seals every stored tenant, `concurrency` at a time.
pub async fn rotate(store: &FirestoreCredentialStore, concurrency: usize) -> anyhow::Result<RotateReport> {
    let tenants = store.list_tenants().await.map_err(|e| anyhow::anyhow!("listing tenants: {e}"))?;
    let outcomes: Vec<_> = futures_util::stream::iter(tenants)
        .map(|t| async move {
            let outcome = store.reseal(&t).await;
            (t, outcome)
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut report = RotateReport { fingerprint: store.cipher().fingerprint().to_string(), ..Default::default() };
    for (tenant, outcome) in outcomes {
        match outcome {
            Ok(Resealed::Done { records }) => {
                report.resealed += 1;
                report.records += records;
            }
            Ok(Resealed::AlreadyCurrent | Resealed::Absent) => report.already_current += 1,
            Ok(Resealed::LostRace) => report.lost_races.push(tenant.to_string()),
            Err(e) => report.failed.push((tenant.to_string(), e.to_string())),
        }
    }
    tracing::info!(
        resealed = report.resealed,
        records = report.records,
        already_current = report.already_current,
        lost_races = report.lost_races.len(),
        failed = report.failed.len(),
        "key rotation done"
    );
    Ok(report)
}
