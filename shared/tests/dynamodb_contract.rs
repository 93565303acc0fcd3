//! The DynamoDB tenant store against DynamoDB Local (or moto_server): the shared port contract, plus what
//! only this adapter can be asked (its items and sparse index, rows planted by hand, outages).
//!
//! Needs `WAKEEPER_TEST_DYNAMODB_ENDPOINT` (`scripts/local-servers start; eval "$(scripts/local-servers env)"`).
//! Without it every test fails, unless `WAKEEPER_SKIP_CLOUD_TESTS=1` says to skip on purpose.
#![cfg(all(feature = "contract-tests", feature = "dynamodb"))]

use std::sync::Arc;

use aws_sdk_dynamodb::types::AttributeValue;
use wakeeper_shared::adapters::dynamodb::{DESIRED_SHARD_ATTRIBUTE, DynamoTenantStore, dynamo_client_for_endpoint};
use wakeeper_shared::contract::{self, fresh_tenant};
use wakeeper_shared::domain::{StatusUpdate, TenantId, TenantStatus, now_millis};
use wakeeper_shared::ports::{StoreError, TenantStore};

/// The endpoint, or `None` when the run chose to skip cloud tests. Panics when neither is set, so a CI that
/// forgot to start the server fails instead of passing silently.
fn endpoint() -> Option<String> {
    match std::env::var("WAKEEPER_TEST_DYNAMODB_ENDPOINT") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("WAKEEPER_SKIP_CLOUD_TESTS").as_deref() == Ok("1") => {
            eprintln!("skipping: WAKEEPER_TEST_DYNAMODB_ENDPOINT is unset and WAKEEPER_SKIP_CLOUD_TESTS=1");
            None
        }
        _ => panic!(
            "WAKEEPER_TEST_DYNAMODB_ENDPOINT is not set: run `scripts/local-servers start` and \
             `eval \"$(scripts/local-servers env)\"` first, or set WAKEEPER_SKIP_CLOUD_TESTS=1 to skip on purpose"
        ),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A store on a table of its own (created here), so runs and tests never share rows.
async fn store() -> Option<DynamoTenantStore> {
    let url = endpoint()?;
    let store = DynamoTenantStore::new(dynamo_client_for_endpoint(&url), format!("wakeeper-test-{}", random_hex(6)));
    store.create_table_if_missing().await.expect("create the test table");
    Some(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_store_contract() {
    let Some(store) = store().await else { return };
    contract::tenant_store_suite(Arc::new(store)).await;
}

/// The suite must hold again on a table that already holds rows, and `create_table_if_missing` is idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_holds_again_on_a_used_table() {
    let Some(store) = store().await else { return };
    let store = Arc::new(store);
    contract::tenant_store_suite(store.clone()).await;
    store.create_table_if_missing().await.expect("a second create is a no-op");
    contract::tenant_store_suite(store).await;
}

/// Only desired tenants carry the index attribute, so the index stays sparse.
#[tokio::test]
async fn the_desired_index_is_sparse() {
    let Some(store) = store().await else { return };
    let raw = dynamo_client_for_endpoint(&endpoint().unwrap());
    let item = |t: TenantId| {
        let raw = raw.clone();
        let table = store.table_name().to_owned();
        async move {
            raw.get_item()
                .table_name(table)
                .key("tenant_id", AttributeValue::S(t.to_string()))
                .consistent_read(true)
                .send()
                .await
                .unwrap()
                .item
                .expect("item exists")
        }
    };
    let t = fresh_tenant();
    store.set_desired(&t, true).await.unwrap();
    let i = item(t.clone()).await;
    assert_eq!(i.get("whatsapp_connected"), Some(&AttributeValue::Bool(true)));
    assert!(i.contains_key(DESIRED_SHARD_ATTRIBUTE), "a desired tenant is in the index");

    store.write_status(&t, &StatusUpdate::terminal(TenantStatus::Replaced, "440"), now_millis()).await.unwrap();
    let i = item(t.clone()).await;
    assert!(!i.contains_key(DESIRED_SHARD_ATTRIBUTE), "a terminal status takes the tenant out of the index");
    assert_eq!(i.get("status"), Some(&AttributeValue::S("replaced".into())));
    assert_eq!(i.get("reason"), Some(&AttributeValue::S("440".into())));

    store.set_desired(&t, true).await.unwrap();
    store.set_desired(&t, false).await.unwrap();
    assert!(!item(t).await.contains_key(DESIRED_SHARD_ATTRIBUTE), "set_desired(false) takes it out");
}

/// Rows planted by hand with a bad id or bad attributes are skipped by listing and `Corrupt` on `get`,
/// without echoing what they hold; the valid tenants around them are served.
#[tokio::test]
async fn bad_rows_are_skipped_and_never_echoed() {
    let Some(store) = store().await else { return };
    let raw = dynamo_client_for_endpoint(&endpoint().unwrap());
    let good = fresh_tenant();
    store.set_desired(&good, true).await.unwrap();
    let bad_status = fresh_tenant();
    for (id, status) in [("../evil", "connected"), (bad_status.as_str(), "evil-status")] {
        raw.put_item()
            .table_name(store.table_name())
            .item("tenant_id", AttributeValue::S(id.into()))
            .item("whatsapp_connected", AttributeValue::Bool(true))
            .item(DESIRED_SHARD_ATTRIBUTE, AttributeValue::N("0".into()))
            .item("status", AttributeValue::S(status.into()))
            .send()
            .await
            .unwrap();
    }
    let mut token = None;
    let mut listed = Vec::new();
    loop {
        let page = store.list_desired(token, 1).await.expect("listing walks past bad rows");
        listed.extend(page.items.into_iter().map(|r| r.tenant_id));
        match page.next {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(listed, vec![good], "only the valid tenant is listed");
    match store.get(&bad_status).await {
        Err(StoreError::Corrupt(msg)) => assert!(!msg.contains("evil"), "no hostile text echoed: {msg}"),
        other => panic!("a row with an unknown status: want Corrupt, got {other:?}"),
    }
}

/// A DynamoDB that cannot be reached is `Unavailable` (transient) on every entry point.
#[tokio::test]
async fn an_unreachable_dynamodb_is_unavailable() {
    if endpoint().is_none() {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = DynamoTenantStore::new(dynamo_client_for_endpoint(&format!("http://127.0.0.1:{port}")), "down");
    let t = fresh_tenant();
    let now = now_millis();
    let up = StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true };
    let results: Vec<Result<(), StoreError>> = vec![
        store.get(&t).await.map(|_| ()),
        store.list_desired(None, 10).await.map(|_| ()),
        store.set_desired(&t, true).await,
        store.write_status(&t, &up, now).await.map(|_| ()),
        store.record_failure(&t).await.map(|_| ()),
        store.acquire_lease(&t, "host-a", None, 1_000, now).await.map(|_| ()),
        store.create_table_if_missing().await,
    ];
    for r in results {
        match r {
            Err(e @ StoreError::Unavailable(_)) => assert!(e.is_transient()),
            other => panic!("an unreachable dynamodb: want Unavailable, got {other:?}"),
        }
    }
}

/// A table that does not exist is `Unavailable` (a deployment fault to retry), not `NotFound` or a panic.
#[tokio::test]
async fn a_missing_table_is_unavailable() {
    let Some(url) = endpoint() else { return };
    let store = DynamoTenantStore::new(dynamo_client_for_endpoint(&url), format!("missing-{}", random_hex(4)));
    match store.get(&fresh_tenant()).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("a missing table: want Unavailable, got {other:?}"),
    }
}
