//! Scenario 7: two hosts whose wall clocks disagree by a minute (libfaketime: one 30 s ahead, one 30 s
//! behind; monotonic clocks untouched). The host behind starts first and holds every tenant when the one ahead
//! joins; then the host holding the most is killed, its tenants taken by the other, and restarted, twice per
//! trial, so tenants move both ways. No lease rule may compare the two clocks: nobody ends `replaced`, no
//! device is ever connected from both hosts, every failover completes within two lease lifetimes and 4 s.

use std::time::Duration;

use wakeeper_shared::domain::{SessionState, TenantId, now_millis};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

use super::fleet::*;
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_wall_clocks_never_give_a_tenant_two_owners() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(120 + 120 * settings.fleet_trials as u64);
    tokio::time::timeout(limit, skewed_clocks(&settings)).await.expect("chaos scenario timed out");
}

async fn skewed_clocks(settings: &Settings) {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let (dirs_a, dirs_b) = Dirs::pair_sharing_key();
    let Some(stores) = CloudStores::fresh("chaosskew", dirs_a.cipher()).await else { return };
    let ids: Vec<TenantId> = (0..settings.fleet_tenants).map(|i| tid(&format!("skew-{i:02}"))).collect();
    stores.seed(&wa, &ids).await;
    let ttl = Duration::from_secs(LEASE_TTL_S);
    let env = |offset: &str| {
        let mut env = fleet_env(&stores);
        env.extend(skewed_clock(offset));
        env
    };
    let started_ms = now_millis();
    // The slow clock first, alone: it holds every tenant when the fast one joins (whose clock says those
    // leases ran out half a minute ago).
    let mut members = vec![Member::start("host-behind", dirs_b, &wa.url(), env("-30s"))];
    members[0].host.ready().await;
    let mut c = Counts::default();
    let mut watch = Watch::default();
    let (off, _) = watch.converge(&members, &wa, &ids, Duration::from_secs(60)).await;
    assert_eq!(off, 0, "set-up: every tenant open on the host behind");
    members.push(Member::start("host-ahead", dirs_a, &wa.url(), env("+30s")));
    members[1].host.ready().await;
    let offsets: Vec<Option<f64>> = members.iter().map(|m| log_clock_offset_s(&m.host.log, started_ms)).collect();
    // A failover must finish within two lease lifetimes and a margin on the taker's own clock (it may have to
    // watch a lease it has just seen for a whole lifetime), whatever the holder's clock says: a taker that
    // trusts a wall-clock expiry written by a host 60 s ahead of it waits a minute instead.
    let failover_limit = ttl * 2 + Duration::from_secs(4);
    watch.observe(&members, &wa, &ids, ttl * 2).await;
    let (off, _) = watch.converge(&members, &wa, &ids, failover_limit).await;
    let mut not_open = off as u64;
    let mut failovers = Vec::new();
    for _ in 0..settings.fleet_trials {
        // Twice: the host holding the most tenants is killed, so they move one way and then the other.
        for _ in 0..2 {
            let mut held = Vec::new();
            for m in &members {
                held.push(m.states().await.values().filter(|s| **s == SessionState::Open).count());
            }
            let victim = if held[0] >= held[1] { 0 } else { 1 };
            members[victim].kill().await;
            let (off, took) = watch.converge(&members, &wa, &ids, failover_limit).await;
            not_open += off as u64;
            failovers.push((members[victim].name, held[victim], took.as_secs_f64()));
            members[victim].restart().await;
            // Both running again: watch a lease lifetime for the restarted host taking tenants it should not.
            let (off, _) = watch.converge(&members, &wa, &ids, failover_limit).await;
            not_open += off as u64;
            watch.observe(&members, &wa, &ids, ttl).await;
        }
    }
    let (off, _) = watch.converge(&members, &wa, &ids, Duration::from_secs(10)).await;
    not_open += off as u64;
    let doubled_devices = doubled(&wa);
    for m in members.iter_mut() {
        m.stop().await;
    }
    let marked = marked_in_table(stores.tenants.as_ref(), &ids).await;

    let shown = |o: Option<f64>| o.map_or("unknown".to_string(), |s| format!("{s:+.1} s"));
    c.info("tenants", ids.len());
    c.info(
        "trials (the host holding the most SIGKILLed, restarted once its tenants moved; twice)",
        settings.fleet_trials,
    );
    c.bound(
        "wall clocks as the hosts' first log lines show them (want about -30 s and +30 s)",
        format!("{}, {}", shown(offsets[0]), shown(offsets[1])),
        offsets[0].is_some_and(|o| o < -20.0) && offsets[1].is_some_and(|o| o > 20.0),
    );
    c.zero(&format!("tenants not open on exactly one host {failover_limit:?} after a kill or restart"), not_open);
    for (victim, held, took) in &failovers {
        c.info(
            &format!("time to every tenant open on one host after {victim} (holding {held}) was killed"),
            format!("{took:.2} s"),
        );
    }
    c.zero("devices connected twice at once (the server's per-device maximum above 1)", doubled_devices);
    watch.report(&mut c);
    c.zero("tenants marked or not desired in the tenant table at the end", marked.len() as u64);
    report_metrics(&mut c, &members);
    let doubled_tenants: Vec<String> = wa
        .observations()
        .devices
        .into_values()
        .filter(|d| d.max_concurrent_connections > 1)
        .filter_map(|d| d.tenant)
        .collect();
    if !doubled_tenants.is_empty() {
        println!("  connected twice at once: {doubled_tenants:?}");
    }
    // The story of the first tenant marked, else connected twice, else replaced.
    let first = marked
        .first()
        .map(|t| t.to_string())
        .or(doubled_tenants.first().cloned())
        .or(watch.replaced.first().map(|t| t.to_string()));
    if let Some(first) = first {
        println!("  (timestamps below are each host's own, skewed, wall clock)");
        tenant_story(&members, &first, 60);
    }
    sim.shutdown().await;
    c.finish("two hosts with wall clocks 30 s ahead and 30 s behind, failing over both ways");
}
