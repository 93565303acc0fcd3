//! Contract suites for the storage ports: every adapter (embedded, Firestore, DynamoDB) runs the same cases, so
//! the rest of wakeeper can rely on the port's documented behaviour rather than on one adapter's.
//!
//! The suites panic with a message naming the broken rule. Each run uses fresh random tenant ids
//! (`t-<hex>`), so a suite can run again and again against a long-lived emulator without cleaning up.
//! Only tests link this module (`cfg(test)` or the `contract-tests` feature).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Barrier;

use crate::crypto::random_hex;
use crate::domain::{
    ChangeBatch, CredentialSnapshot, DeviceRecord, Lease, MAX_RECORD_VALUE_LEN, MAX_WRITES_PER_COMMIT, RecordChange,
    RecordKey, RecordKind, StatusUpdate, TenantId, TenantStatus, UnixMillis, now_millis,
};
use crate::ports::{Conflict, CredentialStore, StoreError, StoredAt, TenantStore};

/// Raw access an adapter grants the suite so it can play the attacker (or the buggy migration) that moves
/// sealed values between rows; the cipher must then refuse them.
#[async_trait]
pub trait SwapRecords: Send + Sync {
    /// Exchanges the stored (sealed) values of two records of one tenant, leaving everything else alone.
    async fn swap_stored_values(&self, tenant: &TenantId, a: &RecordKey, b: &RecordKey);

    /// Copies the stored (sealed) value of `key` from one tenant to the same key of another.
    async fn copy_stored_value(&self, from: &TenantId, to: &TenantId, key: &RecordKey);
}

/// A tenant id no earlier run has used: `t-` and 16 random hex digits.
pub fn fresh_tenant() -> TenantId {
    TenantId::parse(&format!("t-{}", random_hex(8))).expect("a generated tenant id is valid")
}

/// A device record that passes [`CredentialSnapshot::check_restorable`], for tests across the workspace.
pub fn restorable_device() -> DeviceRecord {
    DeviceRecord {
        registration_id: 4242,
        noise_key: vec![1; 64],
        identity_key: vec![2; 64],
        signed_pre_key: vec![3; 64],
        signed_pre_key_id: 1,
        signed_pre_key_signature: vec![4; 64],
        adv_secret_key: vec![5; 32],
        account: Some(vec![6; 120]),
        push_name: "Contract Test".into(),
        rest: serde_json::Map::from_iter([
            ("pn".to_string(), serde_json::json!("5511999990000:7@s.whatsapp.net")),
            ("login_counter".to_string(), serde_json::json!(3)),
        ]),
    }
}

/// A value that is recognisable in a dump or an error message, so the suites can check it never leaks.
fn secret(label: &str) -> Vec<u8> {
    format!("secret-{label}-{}", random_hex(4)).into_bytes()
}

fn put(kind: RecordKind, key: &str, value: Vec<u8>) -> RecordChange {
    RecordChange { key: RecordKey::new(kind, key), value: Some(value) }
}

fn del(kind: RecordKind, key: &str) -> RecordChange {
    RecordChange { key: RecordKey::new(kind, key), value: None }
}

fn batch(generation: u64, epoch: u64, changes: Vec<RecordChange>) -> ChangeBatch {
    ChangeBatch { generation, epoch, changes }
}

/// Records of many kinds with keys shaped like the engine's (addresses with `@`, `:` and `.`, ids, a key with
/// a `/` as base64 produces), an empty value and a large binary one.
fn varied_changes() -> Vec<RecordChange> {
    let mut device = restorable_device();
    device.push_name = String::from_utf8(secret("push-name")).expect("ascii");
    let large: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    vec![
        RecordChange { key: RecordKey::device(), value: Some(device.to_bytes()) },
        put(RecordKind::Identity, "5511999990000.0", secret("identity")),
        put(RecordKind::Session, "5511999990000.0", secret("session-a")),
        put(RecordKind::Session, "123456789012345@lid.3", secret("session-b")),
        put(RecordKind::PreKey, "17", secret("pre-key")),
        put(RecordKind::SignedPreKey, "1", secret("signed-pre-key")),
        put(RecordKind::SenderKey, "120363000000000000@g.us::5511999990000::0", secret("sender-key")),
        put(RecordKind::AppStateSyncKey, "00000001ab", secret("sync-key")),
        put(RecordKind::AppStateVersion, "critical_block", secret("version")),
        put(RecordKind::AppStateMutationMac, "regular_low:q+/Zm9vYmFy==", secret("mac")),
        put(RecordKind::LidMapping, "123456789012345", Vec::new()),
        put(RecordKind::Other, "blob", large),
    ]
}

fn applied(generation: u64, base: &CredentialSnapshot, changes: &[RecordChange]) -> CredentialSnapshot {
    let mut s = base.clone();
    s.apply(changes);
    s.generation = generation;
    s
}

async fn read_ok(store: &dyn CredentialStore, tenant: &TenantId, what: &str) -> CredentialSnapshot {
    store.read(tenant).await.unwrap_or_else(|e| panic!("{what}: read of {tenant} failed: {e:?}"))
}

async fn write_ok(store: &dyn CredentialStore, tenant: &TenantId, b: &ChangeBatch, what: &str) {
    store.write(tenant, b).await.unwrap_or_else(|e| panic!("{what}: write to {tenant} failed: {e:?}"));
}

/// Compares without printing record values (they may be large); names the first differing key.
fn assert_snapshot_eq(got: &CredentialSnapshot, want: &CredentialSnapshot, what: &str) {
    assert_eq!(got.generation, want.generation, "{what}: generation");
    let got_keys: Vec<_> = got.records.keys().collect();
    let want_keys: Vec<_> = want.records.keys().collect();
    assert_eq!(got_keys, want_keys, "{what}: record keys");
    for (k, v) in &want.records {
        assert!(got.records[k] == *v, "{what}: value of {k} differs from what was written");
    }
}

fn assert_corrupt_without_leak(result: Result<CredentialSnapshot, StoreError>, secrets: &[&[u8]], what: &str) {
    match result {
        Err(StoreError::Corrupt(msg)) => {
            for s in secrets {
                let s = String::from_utf8_lossy(s);
                assert!(!msg.contains(s.as_ref()), "{what}: the Corrupt message leaks a record value: {msg}");
            }
        }
        Err(e) => panic!("{what}: want Corrupt, got error {e:?}"),
        Ok(s) => panic!("{what}: want Corrupt, the read succeeded with {} records", s.records.len()),
    }
}

fn assert_stale_epoch(result: Result<(), StoreError>, presented: u64, current: u64, what: &str) {
    match result {
        Err(StoreError::Conflict(Conflict::StaleEpoch { presented: p, current: c })) => {
            assert_eq!((p, c), (presented, current), "{what}: StaleEpoch carries (presented, current)");
        }
        other => panic!("{what}: want Conflict(StaleEpoch {{ {presented}, {current} }}), got {other:?}"),
    }
}

mod credentials;
mod tenants;
mod writers;

pub use credentials::*;
pub use tenants::*;
pub use writers::{ModelRun, writers_model_check};
