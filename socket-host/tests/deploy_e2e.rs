//! Deploys are where sessions used to die (issue 11): SIGTERM arrives in the middle of a restore, and the next
//! container starts right after. The host must exit within its deadline with every lease released and
//! replication flushed, and the next host must take every tenant at once with no double connection.

use std::time::Duration;

use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::domain::{SessionState, TenantId};
use wakeeper_shared::ports::TenantStore;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

const NOBODY: u32 = 65534;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_restore_releases_everything_and_the_next_host_takes_over_at_once() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let tenants: Vec<TenantId> = (0..200).map(|i| tid(&format!("deploy-{i:03}"))).collect();
    seed_embedded(&dirs, &wa, &tenants).await;
    // A slow governor keeps the restore going when SIGTERM arrives; a long lease makes any unreleased lease
    // visible (the next host would wait a minute for it).
    let env = [
        ("WAKEEPER_CONNECT_RATE", "60".to_string()),
        ("WAKEEPER_CONNECT_BURST", "5".to_string()),
        ("WAKEEPER_LEASE_TTL_S", "60".to_string()),
        ("WAKEEPER_SHUTDOWN_DEADLINE_S", "10".to_string()),
    ];
    let mut old = spawn_unprivileged(socket_host_bin!(), &dirs, &wa.url(), "old-container", NOBODY, &env);
    old.ready().await;
    let client = old.client.clone();
    wait_until(Duration::from_secs(30), "restore under way", || {
        let c = client.clone();
        async move {
            let l = c.sessions().await.ok()?;
            let open = l.sessions.iter().filter(|s| s.state == SessionState::Open).count();
            (open >= 40).then_some(())
        }
    })
    .await;
    let open_at_sigterm =
        old.client.sessions().await.unwrap().sessions.iter().filter(|s| s.state == SessionState::Open).count();
    assert!(open_at_sigterm < 200, "the restore was still under way ({open_at_sigterm} open)");
    let took = old.terminate(Duration::from_secs(12));
    assert!(took <= Duration::from_secs(10), "exit took {took:?}, over the 10 s deadline");
    let log = std::fs::read_to_string(&old.log).unwrap();
    assert!(log.contains("host stopped"), "clean stop logged: {}", old.log_tail());
    assert!(log.contains("pending_changes=0"), "replication flushed: {}", old.log_tail());
    assert_eq!(wa.summary().logged_in_connections, 0, "every client of the old host is down");

    {
        let store = EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap();
        for t in &tenants {
            let rec = store.get(t).await.unwrap().unwrap();
            if let Some(lease) = rec.lease {
                assert!(
                    lease.expires_at <= wakeeper_shared::domain::now_millis(),
                    "{t}: lease still held after SIGTERM"
                );
            }
        }
    }

    let new = spawn_unprivileged(socket_host_bin!(), &dirs, &wa.url(), "new-container", NOBODY, &env[..2]);
    new.ready().await;
    new.all_open(200, Duration::from_secs(30)).await;
    let doubled: Vec<_> =
        wa.observations().devices.into_values().filter(|d| d.max_concurrent_connections > 1).map(|d| d.jid).collect();
    assert!(doubled.is_empty(), "double connections: {doubled:?}");
    drop(new);
    sim.shutdown().await;
}
