//! Two hosts with different ids over the same stores (issue 5): each tenant is connected by exactly one host at
//! any moment, and when one host dies its tenants move to the other once their leases expire.

use std::time::Duration;

use wakeeper_shared::domain::{SessionState, TenantId};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_per_tenant_and_failover_after_lease_expiry() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let (dirs_a, dirs_b) = Dirs::pair_sharing_key();
    let Some(stores) = CloudStores::fresh("twohosts", dirs_a.cipher()).await else { return };
    let tenants: Vec<TenantId> = (0..100).map(|i| tid(&format!("shared-{i:03}"))).collect();
    stores.seed(&wa, &tenants).await;

    let ttl = [("WAKEEPER_LEASE_TTL_S", "6".to_string())];
    let mut a = TestHost::spawn(socket_host_bin!(), &dirs_a, &wa.url(), "host-a", &stores.host_env(&ttl));
    let b = TestHost::spawn(socket_host_bin!(), &dirs_b, &wa.url(), "host-b", &stores.host_env(&ttl));
    a.ready().await;
    b.ready().await;

    // Together they hold every tenant open, each tenant on exactly one of them.
    let (ca, cb) = (a.client.clone(), b.client.clone());
    wait_until(Duration::from_secs(60), "100 tenants open across both hosts", || {
        let (ca, cb) = (ca.clone(), cb.clone());
        async move {
            let open = |l: wakeeper_shared::domain::SessionList| {
                l.sessions.into_iter().filter(|s| s.state == SessionState::Open).count()
            };
            let (la, lb) = (ca.sessions().await.ok()?, cb.sessions().await.ok()?);
            (open(la) + open(lb) == 100).then_some(())
        }
    })
    .await;
    assert_eq!(wa.summary().logged_in_connections, 100, "exactly one connection per tenant");
    let on_a: Vec<TenantId> = a
        .client
        .sessions()
        .await
        .unwrap()
        .sessions
        .into_iter()
        .filter(|s| s.state == SessionState::Open)
        .map(|s| s.tenant_id)
        .collect();
    assert!(!on_a.is_empty(), "host A took some tenants");

    // Host A dies without releasing anything; B takes A's tenants once their leases expire.
    a.kill9();
    b.all_open(100, Duration::from_secs(60)).await;
    assert_eq!(wa.summary().logged_in_connections, 100);
    let doubled: Vec<_> =
        wa.observations().devices.into_values().filter(|d| d.max_concurrent_connections > 1).map(|d| d.jid).collect();
    assert!(doubled.is_empty(), "devices connected twice at once: {doubled:?}");
    drop(b);
    sim.shutdown().await;
}

/// Logout runs only on the lease holder (issue 17): on the other host it answers 409 `lease_held` and changes
/// nothing; on the holder it unlinks the device on the WhatsApp side and deletes the credentials for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_only_on_the_lease_holder_and_for_good() {
    use wakeeper_shared::host_api::ClientError;
    use wakeeper_shared::ports::{CredentialStore, StoreError, TenantStore};

    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let (dirs_a, dirs_b) = Dirs::pair_sharing_key();
    let Some(stores) = CloudStores::fresh("logout", dirs_a.cipher()).await else { return };
    let t = tid("resto-logout");
    stores.seed(&wa, std::slice::from_ref(&t)).await;

    let holder = TestHost::spawn(socket_host_bin!(), &dirs_a, &wa.url(), "host-a", &stores.host_env(&[]));
    holder.ready().await;
    holder.wait_state(&t, SessionState::Open, Duration::from_secs(30)).await;
    let other = TestHost::spawn(socket_host_bin!(), &dirs_b, &wa.url(), "host-b", &stores.host_env(&[]));
    other.ready().await;
    let device = || wa.observations().devices.into_values().find(|d| d.tenant.as_deref() == Some(t.as_str()));

    match other.client.logout(&t).await {
        Err(ClientError::Refused { status: 409, code }) => assert_eq!(code, "lease_held"),
        other => panic!("logout on the host without the lease: want 409 lease_held, got {other:?}"),
    }
    assert!(stores.creds.read(&t).await.is_ok(), "the refused logout deleted nothing");
    assert!(!device().expect("the device is registered").revoked, "the refused logout unlinked nothing");
    let open = holder.client.sessions().await.unwrap().sessions.into_iter().find(|s| s.tenant_id == t);
    assert_eq!(open.map(|s| s.state), Some(SessionState::Open), "the holder's session is untouched");

    holder.client.logout(&t).await.expect("logout on the holder");
    assert!(device().expect("the device is still known").revoked, "the holder's logout unlinked the device");
    let gone = || async { matches!(stores.creds.read(&t).await, Err(StoreError::NotFound)) };
    assert!(gone().await, "the credentials are deleted when the logout answers");
    // Long enough for any replication still queued anywhere to have landed (it flushes every 250 ms).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(gone().await, "nothing brought the credentials back");
    let record = stores.tenants.get(&t).await.unwrap().expect("the tenant's record");
    assert_eq!(record.status, Some(wakeeper_shared::domain::TenantStatus::LoggedOut));
    drop((holder, other));
    sim.shutdown().await;
}
