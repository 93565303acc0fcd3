//! The engine store (whatsapp-rust's `Backend` over the working copy) and the replicator.
//!
//! The contract runs the engine's own trait methods for every record kind, reopens the store from disk and
//! checks again, then checks that what was replicated equals the local copy: against the embedded redb store
//! always, and against the Firestore emulator when `FIRESTORE_EMULATOR_HOST` is set.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use socket_host::engine_store::EngineStore;
use socket_host::replicator::{CommitInfo, Replica, Replicator, ReplicatorConfig, ReplicatorHandle};
use tokio::time::Instant;
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::crypto::Cipher;
use wakeeper_shared::domain::{ChangeBatch, CredentialSnapshot, RecordChange, RecordKey, RecordKind, TenantId};
use wakeeper_shared::local::WorkingCopy;
use wakeeper_shared::ports::{CredentialStore, StoreError, StoredAt};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::libsignal::protocol::{DeviceId, ProtocolAddress};
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, Backend, DeviceInfo, DeviceListRecord, DeviceStore, LidPnMappingEntry,
    MsgSecretEntry, MsgSecretStore, PendingInboundKey, PendingInboundRow, ProtocolStore, SignalStore, TcTokenEntry,
};
use whatsapp_rust::wacore::store::{PersistenceManager, SignalStoreCache};

fn cipher() -> Cipher {
    Cipher::new(&[0x42; 32])
}

fn tid(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

fn open(dir: &Path, tenant: &TenantId, replica: Replica) -> Arc<EngineStore> {
    EngineStore::open(WorkingCopy::open(dir, tenant.clone(), cipher()).unwrap(), replica).unwrap()
}

fn detached(dir: &Path, tenant: &TenantId) -> Arc<EngineStore> {
    open(dir, tenant, Replica::detached(tenant.clone()))
}

fn local(dir: &Path, tenant: &TenantId) -> CredentialSnapshot {
    WorkingCopy::open(dir, tenant.clone(), cipher()).unwrap().load().unwrap().unwrap()
}

fn fast_config() -> ReplicatorConfig {
    ReplicatorConfig {
        window: Duration::from_millis(40),
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ..Default::default()
    }
}

/// Polls `f` until it holds or `secs` pass.
async fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- the contract: every record kind through the engine's trait methods ------------------------------------

fn sync_key(n: u8) -> AppStateSyncKey {
    AppStateSyncKey { key_data: vec![n; 32], fingerprint: vec![n, 1, 2], timestamp: 1000 + i64::from(n) }
}

fn lid(lid: &str, pn: &str, at: i64) -> LidPnMappingEntry {
    LidPnMappingEntry {
        lid: lid.into(),
        phone_number: pn.into(),
        created_at: at,
        updated_at: at,
        learning_source: "usync".into(),
    }
}

/// Writes one of everything (with updates and deletes), returning the checks to run before and after a reopen.
async fn write_everything(s: &EngineStore) {
    // Identities.
    s.put_identity("111@c.us.0", [1; 32]).await.unwrap();
    s.put_identity("111@c.us.0", [2; 32]).await.unwrap();
    s.put_identities_batch(&[(Arc::from("222:3@c.us.0"), [3; 32]), (Arc::from("333@lid.0"), [4; 32])]).await.unwrap();
    s.put_identity("444@c.us.0", [5; 32]).await.unwrap();
    s.delete_identity("444@c.us.0").await.unwrap();
    s.delete_identity("never@c.us.0").await.unwrap();
    // Sessions (a long one stays on disk, a short one in memory).
    s.put_session("111@c.us.0", &[7; 2000]).await.unwrap();
    s.put_session("111@c.us.0", &[8; 2500]).await.unwrap();
    s.put_sessions_batch(&[
        (Arc::from("222:3@c.us.0"), Bytes::from_static(b"tiny")),
        (Arc::from("555@c.us.0"), Bytes::from(vec![9; 700])),
    ])
    .await
    .unwrap();
    s.delete_session("555@c.us.0").await.unwrap();
    // Pre-keys.
    let batch: Vec<(u32, Bytes)> = (1..=812).map(|i| (i, Bytes::from(vec![(i % 251) as u8; 70]))).collect();
    s.store_prekeys_batch(&batch, false).await.unwrap();
    s.store_prekey(900, &[42; 70], true).await.unwrap();
    s.remove_prekey(5).await.unwrap();
    s.mark_prekeys_uploaded(&[4, 5, 6]).await.unwrap();
    // Signed pre-keys.
    s.store_signed_prekey(1, &[1; 100]).await.unwrap();
    s.store_signed_prekey(2, &[2; 100]).await.unwrap();
    s.store_signed_prekey(3, &[3; 100]).await.unwrap();
    s.remove_signed_prekey(2).await.unwrap();
    // Sender keys.
    s.put_sender_key("group@g.us::111::0", &[5; 400]).await.unwrap();
    s.put_sender_keys_batch(&[(Arc::from("group@g.us::222::0"), Bytes::from(vec![6; 30]))]).await.unwrap();
    s.put_sender_key("gone@g.us::1::0", &[1; 10]).await.unwrap();
    s.delete_sender_key("gone@g.us::1::0").await.unwrap();
    // App state.
    s.set_sync_key(&[0xAA, 1], sync_key(1)).await.unwrap();
    s.set_sync_key(&[0xAA, 2], sync_key(2)).await.unwrap();
    let mut hs = HashState { version: 7, ..Default::default() };
    hs.hash[0] = 9;
    hs.index_value_map.insert("idx".into(), vec![1, 2, 3]);
    s.set_version("regular_high", hs).await.unwrap();
    let macs: Vec<AppStateMutationMAC> =
        (0..40u8).map(|i| AppStateMutationMAC { index_mac: vec![i; 32], value_mac: vec![i ^ 0xFF; 32] }).collect();
    s.put_mutation_macs("regular_high", 7, &macs).await.unwrap();
    s.put_mutation_macs("regular", 3, &macs[..5]).await.unwrap();
    s.put_mutation_macs("regular_low", 3, &macs[..5]).await.unwrap();
    s.delete_mutation_macs("regular_high", &[vec![0; 32], vec![1; 32]]).await.unwrap();
    s.clear_mutation_macs("regular_low").await.unwrap();
    // Sender-key distribution status.
    s.set_sender_key_status("g1@g.us", &[("111:1@s.whatsapp.net", true), ("222:0@s.whatsapp.net", false)])
        .await
        .unwrap();
    s.set_sender_key_status("g2@g.us", &[("111:1@s.whatsapp.net", true), ("333:0@s.whatsapp.net", true)])
        .await
        .unwrap();
    s.set_sender_key_status("g3@g.us", &[("999:0@s.whatsapp.net", true)]).await.unwrap();
    s.delete_sender_key_device_rows(&["333:0@s.whatsapp.net"]).await.unwrap();
    s.clear_sender_key_devices("g3@g.us").await.unwrap();
    // LID mappings (one LID moves to another phone).
    s.put_lid_mapping(&lid("100", "5511", 1)).await.unwrap();
    s.put_lid_mappings(&[lid("200", "5522", 2), lid("300", "5533", 3)]).await.unwrap();
    s.put_lid_mapping(&lid("300", "5544", 4)).await.unwrap();
    // Base keys.
    s.save_base_key("111@c.us.0", "MSG1", &[1; 33]).await.unwrap();
    s.save_base_key("111@c.us.0", "MSG2", &[2; 33]).await.unwrap();
    s.delete_base_key("111@c.us.0", "MSG2").await.unwrap();
    // Device lists.
    let dl = |user: &str, n: u32| DeviceListRecord {
        user: user.into(),
        devices: (0..n).map(|d| DeviceInfo::new(d, Some(d))).collect(),
        timestamp: 77,
        phash: Some("2:abc".into()),
        raw_id: Some(5),
    };
    s.update_device_list(dl("111", 2)).await.unwrap();
    s.update_device_lists(vec![dl("222", 3), dl("333", 1)]).await.unwrap();
    s.update_device_list(dl("111", 4)).await.unwrap();
    s.delete_devices("333").await.unwrap();
    // Group metadata.
    s.put_group_metadata("g1@g.us", &[1; 300]).await.unwrap();
    s.put_group_metadata("g2@g.us", &[2; 3]).await.unwrap();
    s.delete_group_metadata("g2@g.us").await.unwrap();
    // Trusted-contact tokens.
    s.put_tc_token("a@lid", &TcTokenEntry { token: vec![1; 20], token_timestamp: 100, sender_timestamp: None })
        .await
        .unwrap();
    s.touch_tc_token_sender_timestamp("a@lid", 150).await.unwrap();
    s.touch_tc_token_sender_timestamp("a@lid", 120).await.unwrap(); // never moves back
    s.touch_tc_token_sender_timestamp("b@lid", 130).await.unwrap(); // placeholder
    s.store_received_tc_token("b@lid", &[2; 20], 140).await.unwrap(); // fills the placeholder, keeps the sender ts
    s.store_received_tc_token("b@lid", &[3; 20], 90).await.unwrap(); // older: ignored
    s.put_tc_token("old@lid", &TcTokenEntry { token: vec![4; 20], token_timestamp: 10, sender_timestamp: Some(10) })
        .await
        .unwrap();
    s.put_tc_token("gone@lid", &TcTokenEntry { token: vec![], token_timestamp: 1, sender_timestamp: None })
        .await
        .unwrap();
    s.delete_tc_token("gone@lid").await.unwrap();
    assert_eq!(s.delete_expired_tc_tokens(50, 50).await.unwrap(), 1);
    // Sent messages.
    s.store_sent_message("chat@s.whatsapp.net", "M1", &[1; 200]).await.unwrap();
    s.store_sent_message("chat@s.whatsapp.net", "M2", b"short").await.unwrap();
    s.store_sent_message("chat@s.whatsapp.net", "M3", b"taken").await.unwrap();
    assert_eq!(s.take_sent_message("chat@s.whatsapp.net", "M3").await.unwrap(), Some(b"taken".to_vec()));
    assert_eq!(s.take_sent_message("chat@s.whatsapp.net", "M3").await.unwrap(), None);
    // Pending inbound.
    s.store_pending_inbound("c@s.whatsapp.net", "c:1@s.whatsapp.net", "P1", &[1; 100]).await.unwrap();
    s.store_pending_inbound_batch(&[
        PendingInboundRow { chat: "c@s.whatsapp.net", sender: "c:1@s.whatsapp.net", id: "P2", message: b"two" },
        PendingInboundRow { chat: "c@s.whatsapp.net", sender: "c:1@s.whatsapp.net", id: "P3", message: b"three" },
    ])
    .await
    .unwrap();
    s.delete_pending_inbound("c@s.whatsapp.net", "c:1@s.whatsapp.net", "P2").await.unwrap();
    s.delete_pending_inbound_batch(&[PendingInboundKey {
        chat: "c@s.whatsapp.net",
        sender: "c:1@s.whatsapp.net",
        id: "P9",
    }])
    .await
    .unwrap();
    // Message secrets (merged on conflict: the later deadline and the known parent time win).
    let secret = |id: &str, expires, ts, b| MsgSecretEntry {
        chat: Arc::from("chat@s.whatsapp.net"),
        sender: Arc::from("me@s.whatsapp.net"),
        msg_id: Arc::from(id),
        secret: [b; 32],
        expires_at: expires,
        message_ts: ts,
    };
    assert_eq!(
        s.put_msg_secrets(vec![secret("S1", 500, 50, 1), secret("S2", 100, 0, 2), secret("S3", 0, 0, 3)])
            .await
            .unwrap(),
        3
    );
    s.put_msg_secrets(vec![secret("S1", 200, 0, 4)]).await.unwrap();
    s.put_msg_secret("chat@s.whatsapp.net", "me@s.whatsapp.net", "S4", &[5; 32]).await.unwrap();
    assert_eq!(s.delete_expired_msg_secrets(150).await.unwrap(), 1);
}

async fn check_everything(s: &EngineStore) {
    assert_eq!(s.load_identity("111@c.us.0").await.unwrap(), Some([2; 32]));
    assert_eq!(s.load_identity("222:3@c.us.0").await.unwrap(), Some([3; 32]));
    assert_eq!(s.load_identity("333@lid.0").await.unwrap(), Some([4; 32]));
    assert_eq!(s.load_identity("444@c.us.0").await.unwrap(), None);

    assert_eq!(s.get_session("111@c.us.0").await.unwrap().unwrap(), Bytes::from(vec![8; 2500]));
    assert_eq!(s.get_session("222:3@c.us.0").await.unwrap().unwrap(), Bytes::from_static(b"tiny"));
    assert!(s.get_session("555@c.us.0").await.unwrap().is_none());
    assert!(s.has_session("111@c.us.0").await.unwrap());
    assert!(!s.has_session("555@c.us.0").await.unwrap());
    assert!(s.has_signal_state_for_user("222").await.unwrap());
    assert!(s.has_signal_state_for_user("333").await.unwrap());
    assert!(!s.has_signal_state_for_user("22").await.unwrap());
    assert!(!s.has_signal_state_for_user("555").await.unwrap());

    assert_eq!(s.load_prekey(1).await.unwrap().unwrap(), Bytes::from(vec![1; 70]));
    assert_eq!(s.load_prekey(812).await.unwrap().unwrap(), Bytes::from(vec![(812 % 251) as u8; 70]));
    assert!(s.load_prekey(5).await.unwrap().is_none(), "removed and not resurrected by mark_prekeys_uploaded");
    assert_eq!(s.load_prekey(900).await.unwrap().unwrap(), Bytes::from(vec![42; 70]));
    let got = s.load_prekeys_batch(&[4, 5, 6, 2000]).await.unwrap();
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![4, 6]);
    assert_eq!(s.get_max_prekey_id().await.unwrap(), 900);

    assert_eq!(s.load_signed_prekey(1).await.unwrap(), Some(vec![1; 100]));
    assert_eq!(s.load_signed_prekey(2).await.unwrap(), None);
    assert_eq!(s.load_all_signed_prekeys().await.unwrap(), vec![(1, vec![1; 100]), (3, vec![3; 100])]);

    assert_eq!(s.get_sender_key("group@g.us::111::0").await.unwrap(), Some(vec![5; 400]));
    assert_eq!(s.get_sender_key("group@g.us::222::0").await.unwrap(), Some(vec![6; 30]));
    assert_eq!(s.get_sender_key("gone@g.us::1::0").await.unwrap(), None);

    let k = s.get_sync_key(&[0xAA, 1]).await.unwrap().unwrap();
    assert_eq!((k.key_data, k.fingerprint, k.timestamp), (vec![1; 32], vec![1, 1, 2], 1001));
    assert!(s.get_sync_key(&[0xAA, 3]).await.unwrap().is_none());
    assert_eq!(s.get_latest_sync_key_id().await.unwrap(), Some(vec![0xAA, 2]));
    let hs = s.get_version("regular_high").await.unwrap();
    assert_eq!((hs.version, hs.hash[0], hs.index_value_map.get("idx").cloned()), (7, 9, Some(vec![1, 2, 3])));
    assert_eq!(s.get_version("unknown").await.unwrap().version, 0);
    assert_eq!(s.get_mutation_mac("regular_high", &[7; 32]).await.unwrap(), Some(vec![7 ^ 0xFF; 32]));
    assert_eq!(s.get_mutation_mac("regular_high", &[0; 32]).await.unwrap(), None);
    assert_eq!(
        s.get_mutation_mac("regular", &[1; 32]).await.unwrap(),
        Some(vec![1 ^ 0xFF; 32]),
        "a prefix-named collection survives the clear"
    );
    assert_eq!(s.get_mutation_mac("regular_low", &[1; 32]).await.unwrap(), None);
    let many = s.get_mutation_macs("regular_high", &[[1; 32], [2; 32], [39; 32]]).await.unwrap();
    assert_eq!(many.len(), 2);
    assert_eq!(many[&[39; 32]], vec![39 ^ 0xFF; 32]);

    let mut g1 = s.get_sender_key_devices("g1@g.us").await.unwrap();
    g1.sort();
    assert_eq!(g1, vec![("111:1@s.whatsapp.net".to_string(), true), ("222:0@s.whatsapp.net".to_string(), false)]);
    assert_eq!(s.get_sender_key_devices("g2@g.us").await.unwrap(), vec![("111:1@s.whatsapp.net".to_string(), true)]);
    assert!(s.get_sender_key_devices("g3@g.us").await.unwrap().is_empty());

    assert_eq!(s.get_lid_mapping("100").await.unwrap().unwrap().phone_number, "5511");
    assert_eq!(s.get_pn_mapping("5522").await.unwrap().unwrap().lid, "200");
    assert_eq!(s.get_pn_mapping("5544").await.unwrap().unwrap().lid, "300");
    assert!(s.get_pn_mapping("5533").await.unwrap().is_none(), "the LID moved to another phone");
    let mut all: Vec<_> =
        s.get_all_lid_mappings().await.unwrap().into_iter().map(|e| (e.lid, e.phone_number)).collect();
    all.sort();
    assert_eq!(all, vec![("100".into(), "5511".into()), ("200".into(), "5522".into()), ("300".into(), "5544".into())]);

    assert!(s.has_same_base_key("111@c.us.0", "MSG1", &[1; 33]).await.unwrap());
    assert!(!s.has_same_base_key("111@c.us.0", "MSG1", &[9; 33]).await.unwrap());
    assert!(!s.has_same_base_key("111@c.us.0", "MSG2", &[2; 33]).await.unwrap());

    assert_eq!(s.get_devices("111").await.unwrap().unwrap().devices.len(), 4);
    assert_eq!(s.get_devices("222").await.unwrap().unwrap().raw_id, Some(5));
    assert!(s.get_devices("333").await.unwrap().is_none());

    assert_eq!(s.get_group_metadata("g1@g.us").await.unwrap(), Some(vec![1; 300]));
    assert_eq!(s.get_group_metadata("g2@g.us").await.unwrap(), None);

    let a = s.get_tc_token("a@lid").await.unwrap().unwrap();
    assert_eq!((a.token, a.token_timestamp, a.sender_timestamp), (vec![1; 20], 100, Some(150)));
    let b = s.get_tc_token("b@lid").await.unwrap().unwrap();
    assert_eq!((b.token, b.token_timestamp, b.sender_timestamp), (vec![2; 20], 140, Some(130)));
    assert!(s.get_tc_token("old@lid").await.unwrap().is_none(), "expired by the sweep");
    let mut jids = s.get_all_tc_token_jids().await.unwrap();
    jids.sort();
    assert_eq!(jids, vec!["a@lid", "b@lid"]);

    assert_eq!(
        s.get_pending_inbound("c@s.whatsapp.net", "c:1@s.whatsapp.net", "P1").await.unwrap(),
        Some(vec![1; 100])
    );
    assert_eq!(s.get_pending_inbound("c@s.whatsapp.net", "c:1@s.whatsapp.net", "P2").await.unwrap(), None);
    assert_eq!(
        s.get_pending_inbound("c@s.whatsapp.net", "c:1@s.whatsapp.net", "P3").await.unwrap(),
        Some(b"three".to_vec())
    );

    let (secret, ts) =
        s.get_msg_secret_with_ts("chat@s.whatsapp.net", "me@s.whatsapp.net", "S1").await.unwrap().unwrap();
    assert_eq!((secret, ts), (vec![4; 32], 50), "new secret bytes, parent time kept");
    assert!(s.get_msg_secret("chat@s.whatsapp.net", "me@s.whatsapp.net", "S2").await.unwrap().is_none(), "expired");
    assert_eq!(s.get_msg_secret("chat@s.whatsapp.net", "me@s.whatsapp.net", "S3").await.unwrap(), Some(vec![3; 32]));
    assert_eq!(s.get_msg_secret("chat@s.whatsapp.net", "me@s.whatsapp.net", "S4").await.unwrap(), Some(vec![5; 32]));
    assert!(s.get_msg_secret("other@s.whatsapp.net", "me@s.whatsapp.net", "S1").await.unwrap().is_none());
}

async fn sweeps_after_reopen(s: &EngineStore) {
    // Stored "now": nothing is older than a cutoff far in the past, everything older than one in the future.
    assert_eq!(s.delete_expired_sent_messages(0).await.unwrap(), 0);
    assert_eq!(s.take_sent_message("chat@s.whatsapp.net", "M1").await.unwrap(), Some(vec![1; 200]));
    assert_eq!(s.delete_expired_sent_messages(i64::MAX).await.unwrap(), 1);
    assert_eq!(s.take_sent_message("chat@s.whatsapp.net", "M2").await.unwrap(), None);
    assert_eq!(s.delete_expired_pending_inbound(i64::MAX).await.unwrap(), 2);
}

async fn device_round_trip(s: &EngineStore) -> serde_json::Value {
    assert!(!s.exists().await.unwrap());
    assert_eq!(s.create().await.unwrap(), 1);
    assert!(s.exists().await.unwrap());
    let mut d = s.load().await.unwrap().unwrap();
    d.push_name = "Pizzeria Napoli".into();
    d.login_counter = 41;
    d.next_pre_key_id = 813;
    d.server_has_prekeys = true;
    d.props_hash = Some("abc".into());
    s.save(&d).await.unwrap();
    s.save(&d).await.unwrap();
    serde_json::to_value(&d).unwrap()
}

#[tokio::test]
async fn every_record_kind_round_trips_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let t = tid("contract");
    let s = detached(dir.path(), &t);
    let device = device_round_trip(&s).await;
    write_everything(&s).await;
    check_everything(&s).await;
    let before = local(dir.path(), &t);
    drop(s);

    let s = detached(dir.path(), &t);
    check_everything(&s).await;
    assert_eq!(serde_json::to_value(s.load().await.unwrap().unwrap()).unwrap(), device);
    sweeps_after_reopen(&s).await;
    assert!(before.device().is_ok(), "the device record is wakeeper's DeviceRecord");
    assert_eq!(before.device().unwrap().push_name, "Pizzeria Napoli");
}

#[tokio::test]
async fn every_write_is_on_disk_when_the_call_returns() {
    let dir = tempfile::tempdir().unwrap();
    let t = tid("durable");
    let s = detached(dir.path(), &t);
    let mut generation = 0;
    for i in 0..20u8 {
        s.put_session("x@c.us.0", &[i; 300]).await.unwrap();
        let on_disk = local(dir.path(), &t);
        assert!(on_disk.generation > generation);
        generation = on_disk.generation;
        assert_eq!(on_disk.records[&RecordKey::new(RecordKind::Session, "x@c.us.0")], vec![i; 300]);
    }
    s.put_sessions_batch(&[
        (Arc::from("a@c.us.0"), Bytes::from_static(b"1")),
        (Arc::from("b@c.us.0"), Bytes::from_static(b"2")),
    ])
    .await
    .unwrap();
    assert_eq!(local(dir.path(), &t).generation, generation + 1, "a batch is one append");
    assert_eq!(s.stats().await.generation, generation + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn take_sent_message_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let t = tid("atomic");
    let s = detached(dir.path(), &t);
    for round in 0..10 {
        let id = format!("M{round}");
        s.store_sent_message("chat@s.whatsapp.net", &id, b"payload").await.unwrap();
        let takers: Vec<_> = (0..16)
            .map(|_| {
                let (s, id) = (s.clone(), id.clone());
                tokio::spawn(async move { s.take_sent_message("chat@s.whatsapp.net", &id).await.unwrap() })
            })
            .collect();
        let mut got = 0;
        for t in takers {
            if let Some(p) = t.await.unwrap() {
                assert_eq!(p, b"payload");
                got += 1;
            }
        }
        assert_eq!(got, 1, "round {round}: exactly one taker gets the message");
    }
    let s2 = detached(dir.path(), &t);
    assert_eq!(s2.take_sent_message("chat@s.whatsapp.net", "M0").await.unwrap(), None, "the take is durable");
}

#[tokio::test]
async fn sent_messages_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let s = detached(dir.path(), &tid("bounded"));
    for i in 0..(socket_host::engine_store::MAX_SENT_MESSAGES + 10) {
        s.store_sent_message("c@s.whatsapp.net", &i.to_string(), b"p").await.unwrap();
    }
    let n = local(dir.path(), &tid("bounded")).count(RecordKind::SentMessage);
    assert!(
        n <= socket_host::engine_store::MAX_SENT_MESSAGES && n > socket_host::engine_store::MAX_SENT_MESSAGES / 2,
        "{n}"
    );
    assert_eq!(
        s.take_sent_message("c@s.whatsapp.net", &(socket_host::engine_store::MAX_SENT_MESSAGES + 9).to_string())
            .await
            .unwrap(),
        Some(b"p".to_vec())
    );
}

#[tokio::test]
async fn compaction_keeps_every_value_readable() {
    let dir = tempfile::tempdir().unwrap();
    let t = tid("compact");
    let mut wc = WorkingCopy::open(dir.path(), t.clone(), cipher()).unwrap();
    wc.set_compaction_floor(16 * 1024);
    let s = EngineStore::open(wc, Replica::detached(t.clone())).unwrap();
    let batch: Vec<(u32, Bytes)> = (1..=100).map(|i| (i, Bytes::from(vec![i as u8; 70]))).collect();
    s.store_prekeys_batch(&batch, false).await.unwrap();
    for i in 0..200u32 {
        s.put_session(&format!("{}@c.us.0", i % 7), &vec![i as u8; 600]).await.unwrap();
    }
    let stats = s.stats().await;
    assert!(stats.compactions > 0, "{stats:?}");
    for i in 193..200u32 {
        assert_eq!(
            s.get_session(&format!("{}@c.us.0", i % 7)).await.unwrap().unwrap(),
            Bytes::from(vec![i as u8; 600])
        );
    }
    assert_eq!(s.load_prekey(77).await.unwrap().unwrap(), Bytes::from(vec![77; 70]));
    let snapshot = local(dir.path(), &t);
    drop(s);
    assert_eq!(local(dir.path(), &t), snapshot);
    let s = detached(dir.path(), &t);
    assert_eq!(s.get_session("4@c.us.0").await.unwrap().unwrap(), Bytes::from(vec![193; 600]));
}

#[tokio::test]
async fn the_engine_itself_creates_saves_and_reloads_through_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let t = tid("engine");
    let backend: Arc<dyn Backend> = detached(dir.path(), &t);
    let pm = PersistenceManager::new(backend.clone()).await.unwrap();
    let device = pm.get_device_snapshot().await;
    // The engine's Signal write-back cache flushes into the store like it does after a decrypt.
    let cache = SignalStoreCache::new();
    let addr = ProtocolAddress::new("5511987650001", DeviceId::new(0));
    cache.put_identity(&addr, &[9; 32]).await;
    cache.flush(backend.as_ref()).await.unwrap();
    drop((pm, cache, backend));

    let backend: Arc<dyn Backend> = detached(dir.path(), &t);
    let pm = PersistenceManager::new(backend.clone()).await.unwrap();
    let reloaded = pm.get_device_snapshot().await;
    assert_eq!(reloaded.identity_key.public_key, device.identity_key.public_key, "same identity after a restart");
    assert_eq!(reloaded.noise_key.public_key, device.noise_key.public_key);
    assert_eq!(reloaded.registration_id, device.registration_id);
    let cache = SignalStoreCache::new();
    assert_eq!(cache.get_identity(&addr, backend.as_ref()).await.unwrap().as_deref(), Some(&[9u8; 32][..]));
}

#[tokio::test]
async fn a_restored_session_keeps_little_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let t = tid("memory");
    let s = detached(dir.path(), &t);
    device_round_trip(&s).await;
    let batch: Vec<(u32, Bytes)> = (1..=812).map(|i| (i, Bytes::from(vec![1; 74]))).collect();
    s.store_prekeys_batch(&batch, true).await.unwrap();
    let sessions: Vec<_> =
        (0..50).map(|i| (Arc::from(format!("55119876{i:05}@c.us.0")), Bytes::from(vec![2; 1500]))).collect();
    s.put_sessions_batch(&sessions).await.unwrap();
    let ids: Vec<_> = (0..50).map(|i| (Arc::from(format!("55119876{i:05}@c.us.0")), [3; 32])).collect();
    s.put_identities_batch(&ids).await.unwrap();
    let total = local(dir.path(), &t).records.values().map(|v| v.len() as u64).sum::<u64>();
    drop(s);
    let s = detached(dir.path(), &t);
    let stats = s.stats().await;
    eprintln!("restored: {} records, {total} bytes of values, ~{} bytes in memory", stats.records, stats.memory_bytes);
    assert!(stats.memory_bytes < 40 * 1024, "{stats:?}");
    assert!(stats.memory_bytes < total / 4, "{stats:?} vs {total}");
}

// ---- replication ---------------------------------------------------------------------------------------------

/// A credential store that records commits and fails on demand, over a real store.
struct Flaky<S> {
    inner: S,
    down: AtomicBool,
    /// Apply the next N writes, then report the store unavailable (the reply was lost).
    lose_replies: AtomicUsize,
    log: Mutex<Vec<(TenantId, u64, usize)>>,
}

impl<S> Flaky<S> {
    fn new(inner: S) -> Arc<Self> {
        Arc::new(Self {
            inner,
            down: AtomicBool::new(false),
            lose_replies: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl<S: CredentialStore> CredentialStore for Flaky<S> {
    async fn read(&self, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError> {
        self.inner.read(tenant).await
    }
    async fn generation(&self, tenant: &TenantId) -> Result<Option<u64>, StoreError> {
        self.inner.generation(tenant).await
    }
    async fn write(&self, tenant: &TenantId, batch: &ChangeBatch) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("simulated outage".into()));
        }
        self.inner.write(tenant, batch).await?;
        self.log.lock().unwrap().push((tenant.clone(), batch.generation, batch.changes.len()));
        if self.lose_replies.load(Ordering::SeqCst) > 0 {
            self.lose_replies.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable("reply lost".into()));
        }
        Ok(())
    }
    async fn replace(&self, tenant: &TenantId, snapshot: &CredentialSnapshot, epoch: u64) -> Result<(), StoreError> {
        self.inner.replace(tenant, snapshot, epoch).await
    }
    async fn claim(&self, tenant: &TenantId, epoch: u64) -> Result<Option<StoredAt>, StoreError> {
        self.inner.claim(tenant, epoch).await
    }
    async fn delete(&self, tenant: &TenantId, epoch: u64) -> Result<(), StoreError> {
        self.inner.delete(tenant, epoch).await
    }
    async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.inner.list_tenants().await
    }
}

fn embedded(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir.join("store.redb"), cipher()).unwrap()
}

async fn flush(r: &Replicator) {
    let report = r.flush(Instant::now() + Duration::from_secs(20)).await;
    assert!(report.is_complete(), "{report:?}");
}

/// The whole contract with replication on, then the remote copy must equal the local one.
async fn replicated_contract(store: Arc<dyn CredentialStore>, prefix: &str) {
    let dir = tempfile::tempdir().unwrap();
    let r = Replicator::start(store.clone(), fast_config());
    let h = r.handle();
    let t = tid(&format!("{prefix}contract"));
    let s = open(dir.path(), &t, h.attach(t.clone(), 1));
    device_round_trip(&s).await;
    write_everything(&s).await;
    flush(&r).await;
    assert_eq!(store.read(&t).await.unwrap(), local(dir.path(), &t), "remote equals local");
    drop(s);
    let s = open(dir.path(), &t, h.attach(t.clone(), 1));
    check_everything(&s).await;
    sweeps_after_reopen(&s).await;
    flush(&r).await;
    assert_eq!(store.read(&t).await.unwrap(), local(dir.path(), &t), "remote equals local after more writes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_replicates_to_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    replicated_contract(Arc::new(embedded(dir.path())), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_replicates_to_the_firestore_emulator() {
    if std::env::var("FIRESTORE_EMULATOR_HOST").map_or(true, |h| h.is_empty()) {
        eprintln!("skipping: FIRESTORE_EMULATOR_HOST is not set");
        return;
    }
    let mut rnd = [0u8; 6];
    getrandom::fill(&mut rnd).unwrap();
    let prefix: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    let store = wakeeper_shared::adapters::firestore::FirestoreCredentialStore::new(
        "wakeeper-test",
        cipher(),
        format!("engine{prefix}_"),
    )
    .await
    .expect("connect to the emulator");
    replicated_contract(Arc::new(store), &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_ordered_coalesced_and_converge_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky::new(embedded(dir.path()));
    let commits: Arc<Mutex<Vec<CommitInfo>>> = Arc::default();
    let seen = commits.clone();
    let window = Duration::from_millis(150);
    let config = ReplicatorConfig {
        window,
        on_commit: Some(Arc::new(move |c: &CommitInfo| seen.lock().unwrap().push(c.clone()))),
        ..fast_config()
    };
    let r = Replicator::start(store.clone(), config);
    let h = r.handle();
    let tenants: Vec<_> = (0..5).map(|i| tid(&format!("t{i}"))).collect();
    let stores: Vec<_> = tenants.iter().map(|t| open(dir.path(), t, h.attach(t.clone(), 1))).collect();
    let started = Instant::now();
    let mut writes = 0;
    while started.elapsed() < Duration::from_millis(700) {
        for (i, s) in stores.iter().enumerate() {
            s.put_session(&format!("{}@c.us.0", writes % 3), &[i as u8; 200]).await.unwrap();
            s.put_identity(&format!("{}@c.us.0", writes % 5), [writes as u8; 32]).await.unwrap();
        }
        writes += 1;
    }
    flush(&r).await;
    for t in &tenants {
        assert_eq!(store.read(t).await.unwrap(), local(dir.path(), t), "{t}");
    }
    let commits = commits.lock().unwrap().clone();
    let log = store.log.lock().unwrap().clone();
    for t in &tenants {
        let gens: Vec<u64> = log.iter().filter(|(x, _, _)| x == t).map(|(_, g, _)| *g).collect();
        assert!(gens.windows(2).all(|w| w[0] < w[1]), "{t}: generations rise: {gens:?}");
        let mut starts: Vec<Instant> = commits.iter().filter(|c| &c.tenant == t).map(|c| c.started).collect();
        starts.sort();
        // The last commit may be the flush's, which does not wait for the window.
        for w in starts[..starts.len().saturating_sub(1)].windows(2) {
            assert!(w[1] - w[0] >= window - Duration::from_millis(5), "{t}: two commits within one window");
        }
        assert!(starts.len() < writes * 2 / 3, "{t}: {} commits for {} local writes", starts.len(), writes * 2);
    }
    let stats = r.stats();
    assert_eq!((stats.pending_changes, stats.pending_tenants), (0, 0));
    assert!(stats.commits >= tenants.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_are_split_at_500_writes_with_rising_generations() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky::new(embedded(dir.path()));
    let r = Replicator::start(store.clone(), fast_config());
    let t = tid("big");
    let s = open(dir.path(), &t, r.handle().attach(t.clone(), 1));
    let batch: Vec<(u32, Bytes)> = (1..=1200).map(|i| (i, Bytes::from(vec![1; 70]))).collect();
    s.store_prekeys_batch(&batch, false).await.unwrap();
    flush(&r).await;
    let log = store.log.lock().unwrap().clone();
    assert_eq!(log.iter().map(|(_, g, n)| (*g, *n)).collect::<Vec<_>>(), vec![(1, 500), (2, 500), (3, 200)]);
    let remote = store.read(&t).await.unwrap();
    assert_eq!(remote.generation, 3);
    assert_eq!(remote, local(dir.path(), &t));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_store_is_retried_and_lost_replies_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky::new(embedded(dir.path()));
    let r = Replicator::start(store.clone(), fast_config());
    let t = tid("flaky");
    let s = open(dir.path(), &t, r.handle().attach(t.clone(), 1));

    store.down.store(true, Ordering::SeqCst);
    s.put_session("a@c.us.0", &[1; 100]).await.unwrap();
    eventually(10, "three failed attempts", || r.stats().failed_attempts >= 3).await;
    let stats = r.stats();
    assert_eq!((stats.pending_tenants, stats.pending_changes), (1, 1));
    assert!(stats.lag > Duration::ZERO);
    let report = r.flush(Instant::now() + Duration::from_millis(200)).await;
    assert_eq!((report.pending_tenants, report.pending_changes), (1, 1), "the flush reports what is left");

    // The store comes back, but drops the replies of the next two commits it applies; more writes arrive
    // meanwhile. Retries must resend exactly what may have landed, and never hide new changes behind it.
    store.lose_replies.store(2, Ordering::SeqCst);
    store.down.store(false, Ordering::SeqCst);
    for i in 0..30u8 {
        s.put_session("a@c.us.0", &[i; 100]).await.unwrap();
        s.put_identity(&format!("{i}@c.us.0"), [i; 32]).await.unwrap();
    }
    flush(&r).await;
    assert_eq!(store.read(&t).await.unwrap(), local(dir.path(), &t));
    assert_eq!(r.stats().lag, Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_epoch_fences_the_tenant_and_stops_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky::new(embedded(dir.path()));
    let r = Replicator::start(store.clone(), fast_config());
    let mut fenced = r.take_fenced_events().unwrap();
    assert!(r.take_fenced_events().is_none());
    let (t, other) = (tid("moved"), tid("stays"));
    // Another host took the tenant over (epoch 5) and wrote.
    let mut theirs = CredentialSnapshot { generation: 10, ..Default::default() };
    theirs.records.insert(RecordKey::new(RecordKind::Session, "x"), b"theirs".to_vec());
    store.replace(&t, &theirs, 5).await.unwrap();

    let s = open(dir.path(), &t, r.handle().attach(t.clone(), 3));
    let o = open(dir.path(), &other, r.handle().attach(other.clone(), 3));
    s.put_session("x", b"ours").await.unwrap();
    o.put_session("x", b"fine").await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), fenced.recv()).await.unwrap().unwrap();
    assert_eq!((ev.tenant.clone(), ev.presented, ev.current), (t.clone(), 3, 5));
    assert!(s.put_session("x", b"more").await.is_err(), "a fenced tenant's engine writes fail");
    flush(&r).await;
    assert_eq!(store.read(&t).await.unwrap(), theirs, "the new owner's state is untouched");
    assert_eq!(store.read(&other).await.unwrap(), local(dir.path(), &other), "other tenants carry on");
    assert_eq!(r.stats().fenced, 1);

    // Taking the lease again (a higher epoch) clears the fence.
    let s = open(dir.path(), &t, r.handle().attach(t.clone(), 6));
    s.put_session("y", b"again").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tenants_each_commit_once_per_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky::new(embedded(dir.path()));
    let per_tenant: Arc<Mutex<BTreeMap<TenantId, Vec<Instant>>>> = Arc::default();
    let seen = per_tenant.clone();
    let window = Duration::from_millis(100);
    let config = ReplicatorConfig {
        window,
        on_commit: Some(Arc::new(move |c: &CommitInfo| {
            seen.lock().unwrap().entry(c.tenant.clone()).or_default().push(c.started)
        })),
        ..fast_config()
    };
    let r = Replicator::start(store.clone(), config);
    let h: ReplicatorHandle = r.handle();
    let replicas: Vec<Replica> = (0..1000).map(|i| h.attach(tid(&format!("n{i}")), 1)).collect();
    let mut generation = vec![0u64; replicas.len()];
    for round in 0..5u8 {
        for (i, rep) in replicas.iter().enumerate() {
            let change = RecordChange { key: RecordKey::new(RecordKind::Session, "s"), value: Some(vec![round; 64]) };
            rep.submit(generation[i], generation[i] + 1, vec![change]);
            generation[i] += 1;
        }
    }
    flush(&r).await;
    for (i, rep) in replicas.iter().enumerate().step_by(97) {
        assert_eq!(store.read(rep.tenant()).await.unwrap().generation, generation[i]);
    }
    for (t, starts) in per_tenant.lock().unwrap().iter() {
        for w in starts.windows(2) {
            assert!(w[1] - w[0] >= window - Duration::from_millis(5), "{t}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_lease_supersedes_the_earlier_queue_and_the_earlier_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = Flaky::new(embedded(dir.path()));
    let r = Replicator::start(store.clone(), fast_config());
    let t = tid("reacquired");
    let old = open(dir.path(), &t, r.handle().attach(t.clone(), 1));
    store.down.store(true, Ordering::SeqCst);
    old.put_session("a@c.us.0", b"unreplicated").await.unwrap();
    eventually(10, "a failed attempt", || r.stats().failed_attempts >= 1).await;
    drop(old);

    // The host lost the lease and took it again (epoch 2); the start-up rule pushed the local copy up.
    store.down.store(false, Ordering::SeqCst);
    let snapshot = local(dir.path(), &t);
    store.replace(&t, &snapshot, 2).await.unwrap();
    let old_replica = r.handle().attach(t.clone(), 1);
    let s = open(dir.path(), &t, r.handle().attach(t.clone(), 2));
    assert!(old_replica.is_fenced(), "a replica of the earlier lease may not write any more");
    s.put_session("b@c.us.0", b"after").await.unwrap();
    flush(&r).await;
    assert_eq!(store.read(&t).await.unwrap(), local(dir.path(), &t));
    let stats = r.stats();
    assert_eq!((stats.fenced, stats.pending_changes), (0, 0), "{stats:?}");
}
