//! Baileys auth state -> wakeeper credential snapshot.
//!
//! A Baileys host keeps one tenant's auth state as `useMultiFileAuthState` files: `creds.json` plus one file per
//! key (`<type>-<id>.json`, the id with `/` written as `__` and `:` as `-`), every Buffer written as
//! `{"type":"Buffer","data":"<base64>"}`. This module turns those files into the records the engine store
//! (`crate::engine_store`) reads, in exactly its encoding, so the imported device logs in with the same noise key
//! and identity and keeps its Signal sessions: nobody scans a QR code again.
//!
//! | Baileys file | record |
//! |---|---|
//! | `creds.json` | device (the engine's `Device`, built field by field) |
//! | `pre-key-<id>` | pre_key `<id>`: `PreKeyRecordStructure` protobuf |
//! | `session-<user[_domain]>.<dev>` | session `<user>[:<dev>]@<server>.0`: libsignal-node v1 JSON converted by the engine's own `LegacySessionRecordV1` |
//! | `identity-key-<address>` | identity `<address>`: the 32-byte public key |
//! | `sender-key-<group>--<user[_domain]>--<dev>` | sender_key `<group>:<address>`: states in the engine's order (newest first) |
//! | `app-state-sync-key-<base64 id>` | app_state_sync_key `<hex id>`: `ts ‖ len ‖ key ‖ fingerprint protobuf` |
//! | `app-state-sync-version-<name>` | app_state_version `<name>` (`HashState` JSON) + one app_state_mutation_mac per index MAC |
//! | `lid-mapping-<pn user>` | lid_mapping `<lid user>` (`LidPnMappingEntry` JSON) |
//! | `sender-key-memory-*`, `device-list-*`, `tctoken-*` | not imported (the engine rebuilds them; see the report) |
//!
//! Anything malformed refuses the whole import with the file and field named (never a value): a partial
//! takeover would break sessions in ways nobody notices until messages stop decrypting.
//!
//! # Layout
//! - `auth_files`: collecting the files with names and sizes checked; what a file holds, from its name.
//! - `json`: reading Baileys' JSON (Buffers, 64-bit integers, keys), naming the field in every error.
//! - `address`: Signal addresses and sender-key names as the engine writes them.
//! - `convert`: the whole conversion and its report.
//! - `creds`: `creds.json` -> the engine's device.
//! - `key_files`: one key file -> its records.
//! - `session`, `sender_key`: libsignal-node sessions and sender keys -> the engine's records.
//!
//! The records are keyed and encoded by the engine store's own codec ([`crate::engine_store::codec`]).

mod address;
mod auth_files;
mod convert;
mod creds;
mod json;
mod key_files;
mod sender_key;
mod session;
#[cfg(test)]
mod tests;

pub use address::engine_address;
pub use auth_files::{AuthFiles, check_file_name};
pub use convert::{Converted, Report, convert};

/// Largest single file accepted; checked before the file is read. Real files are far smaller (a session with
/// every archived state and skipped key is well under 1 MiB); the bound keeps hostile input from exhausting
/// memory.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Largest auth state accepted in total.
pub const MAX_TOTAL_BYTES: u64 = 512 * 1024 * 1024;
/// Most files accepted in one auth state.
pub const MAX_FILES: usize = 200_000;

/// Record key of the takeover marker (kind `other`): its presence says the device came from a Baileys host that
/// may still be running it.
pub const MARKER_KEY: &str = "import/baileys";

/// Why an auth state was refused. Names the file and the field, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaileysError {
    /// One file is malformed, hostile or inconsistent.
    #[error("{file}: {problem}")]
    File {
        /// The file name (escaped, shortened).
        file: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The auth state as a whole cannot be used (unreadable folder, too large, `creds.json` missing).
    #[error("{0}")]
    Source(String),
}

/// A file name as it may appear in an error: escaped, at most 120 characters.
fn shown(name: &str) -> String {
    let escaped: String = name.escape_debug().collect();
    if escaped.chars().count() > 120 {
        format!("{}…", escaped.chars().take(120).collect::<String>())
    } else {
        escaped
    }
}

/// Refuses the auth state because of one file.
fn refuse(file: &str, problem: impl Into<String>) -> BaileysError {
    BaileysError::File { file: shown(file), problem: problem.into() }
}
