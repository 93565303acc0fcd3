//! Scenario 6: the lease holder SIGSTOPped for longer than its lease (2.5 lease lifetimes), another host takes
//! over every tenant meanwhile, then SIGCONT. The resumed host must not come back on any tenant: afterwards
//! every tenant is open on exactly one host, still desired, not marked.
//!
//! A frozen process keeps its sockets: when the taker logs a device in, the server still holds the paused
//! host's connection and knocks it off (440 to the older one), as WhatsApp does. Those kicks are inherent to a
//! pause and reported; a kick while no host is paused (the resumed host logging in again) is a double owner.

use std::time::Duration;

use tokio::time::Instant;
use wakeeper_shared::domain::TenantId;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

use super::fleet::*;
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_lease_holder_never_comes_back_on_a_taken_tenant() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(90 + 60 * settings.fleet_trials as u64);
    tokio::time::timeout(limit, paused_holder(&settings)).await.expect("chaos scenario timed out");
}

async fn paused_holder(settings: &Settings) {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let (dirs_a, dirs_b) = Dirs::pair_sharing_key();
    let Some(stores) = CloudStores::fresh("chaospause", dirs_a.cipher()).await else { return };
    let ids: Vec<TenantId> = (0..settings.fleet_tenants).map(|i| tid(&format!("pause-{i:02}"))).collect();
    stores.seed(&wa, &ids).await;
    let ttl = Duration::from_secs(LEASE_TTL_S);
    let env = fleet_env(&stores);
    // A first, alone: it holds every tenant when the first pause comes.
    let mut members = vec![Member::start("host-a", dirs_a, &wa.url(), env.clone())];
    members[0].host.ready().await;
    let mut watch = Watch::default();
    let (off, _) = watch.converge(&members, &wa, &ids, Duration::from_secs(60)).await;
    assert_eq!(off, 0, "set-up: every tenant open on host A");
    members.push(Member::start("host-b", dirs_b, &wa.url(), env));
    members[1].host.ready().await;

    let mut c = Counts::default();
    let pause_for = ttl * 5 / 2;
    let (mut not_taken, mut not_settled, mut kicks_in_pauses, mut kicks_outside) = (0u64, 0u64, 0u64, 0u64);
    let mut takeover_times = Vec::new();
    let mut holder = 0usize;
    let mut kicks_before = kicks(&wa);
    for _ in 0..settings.fleet_trials {
        let taker = 1 - holder;
        kicks_outside += kicks_between(&kicks_before, &kicks(&wa));
        let paused_kicks = kicks(&wa);
        members[holder].pause();
        let paused_at = Instant::now();
        // The taker has every tenant within the lease lifetime and a margin (polling only the running host).
        let (off, took) = watch.converge(&members, &wa, &ids, ttl * 3 + Duration::from_secs(20)).await;
        not_taken += off as u64;
        takeover_times.push(took.as_secs_f64());
        if paused_at.elapsed() < pause_for {
            tokio::time::sleep(pause_for - paused_at.elapsed()).await;
        }
        kicks_before = kicks(&wa);
        kicks_in_pauses += kicks_between(&paused_kicks, &kicks_before);
        members[holder].resume();
        // The resumed host finds out its leases are gone; watch two lease lifetimes for it coming back anywhere.
        let (off, _) = watch.converge(&members, &wa, &ids, Duration::from_secs(30)).await;
        not_settled += off as u64;
        watch.observe(&members, &wa, &ids, ttl * 2).await;
        let (off, _) = watch.converge(&members, &wa, &ids, Duration::from_secs(10)).await;
        not_settled += off as u64;
        holder = taker;
    }
    kicks_outside += kicks_between(&kicks_before, &kicks(&wa));
    for m in members.iter_mut() {
        m.stop().await;
    }
    let marked = marked_in_table(stores.tenants.as_ref(), &ids).await;
    let (write_above, fence_above, compared) = fence_above_lease(&stores, &ids).await;

    c.info(
        &format!("trials (the holder SIGSTOPped {:.0} s, lease ttl {LEASE_TTL_S} s)", pause_for.as_secs_f64()),
        settings.fleet_trials,
    );
    c.info("tenants", ids.len());
    c.zero(
        &format!("tenants the other host had not taken within {:?} of the pause", ttl * 3 + Duration::from_secs(20)),
        not_taken,
    );
    c.info(
        "longest time from SIGSTOP to every tenant open on the other host",
        format!("{:.2} s", takeover_times.iter().copied().fold(0.0, f64::max)),
    );
    c.info("frozen connections the server knocked off when the taker logged in (inherent)", kicks_in_pauses);
    c.zero("logins that knocked a live connection off while no host was paused (two owners)", kicks_outside);
    c.zero("tenants not open on exactly one host after the resume (each check)", not_settled);
    watch.report(&mut c);
    c.zero("tenants marked or not desired in the tenant table at the end", marked.len() as u64);
    c.info("tenants whose store fence was compared with their lease", compared);
    c.zero("tenants whose stored write_epoch is above their lease epoch", write_above);
    c.zero("tenants whose store fence (max_epoch) is above their lease epoch", fence_above);
    report_metrics(&mut c, &members);
    if let Some(first) = marked.first().or(watch.replaced.first()).or(watch.terminal.first()) {
        tenant_story(&members, first.as_str(), 60);
    }
    sim.shutdown().await;
    c.finish(&format!("the lease holder paused past its lease, {} trials", settings.fleet_trials));
}
