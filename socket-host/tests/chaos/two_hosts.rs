//! Scenario 4: two hosts over one store, one killed and restarted again and again: moments a device had two
//! connections.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;
use wakeeper_shared::domain::{SessionState, TenantId};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_never_connect_a_device_twice_across_kills() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(120 + 45 * settings.two_host_trials as u64);
    tokio::time::timeout(limit, two_hosts(&settings)).await.expect("chaos scenario timed out");
}

async fn two_hosts(settings: &Settings) {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let (dirs_a, dirs_b) = Dirs::pair_sharing_key();
    let Some(stores) = CloudStores::fresh("chaostwo", dirs_a.cipher()).await else { return };
    let ids: Vec<TenantId> = (0..30).map(|i| tid(&format!("pair-{i:02}"))).collect();
    stores.seed(&wa, &ids).await;
    let ttl_s = 6u64;
    let env = stores.host_env(&[("WAKEEPER_LEASE_TTL_S", ttl_s.to_string())]);
    let mut a = ChaosHost::spawn(&dirs_a, &wa.url(), "host-a", &env);
    let b = ChaosHost::spawn(&dirs_b, &wa.url(), "host-b", &env);
    a.ready().await;
    b.ready().await;

    let mut c = Counts::default();
    let (mut not_back, mut api_double, mut kills_before_expiry) = (0u64, 0u64, 0u64);
    let mut replaced: BTreeSet<TenantId> = BTreeSet::new();
    let mut logs = vec![a.log.clone(), b.log.clone()];
    let mut settle_times = Vec::new();
    // Every tenant open on exactly one host; counts tenants open on both at one poll.
    async fn converge(
        a: &ChaosHost,
        b: &ChaosHost,
        ids: &[TenantId],
        limit: Duration,
        replaced: &mut BTreeSet<TenantId>,
    ) -> (usize, u64) {
        let deadline = Instant::now() + limit;
        let mut double = 0u64;
        loop {
            let (sa, sb) = (states(a).await, states(b).await);
            let open = |s: &BTreeMap<TenantId, SessionState>, id: &TenantId| s.get(id) == Some(&SessionState::Open);
            double += ids.iter().filter(|id| open(&sa, id) && open(&sb, id)).count() as u64;
            replaced.extend(
                sa.iter().chain(sb.iter()).filter(|(_, s)| **s == SessionState::Replaced).map(|(id, _)| id.clone()),
            );
            let missing = ids.iter().filter(|id| !open(&sa, id) && !open(&sb, id)).count();
            if missing == 0 || Instant::now() > deadline {
                return (missing, double);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (missing, double) = converge(&a, &b, &ids, Duration::from_secs(60), &mut replaced).await;
    assert_eq!(missing, 0, "set-up: every tenant open on one of the hosts");
    api_double += double;
    for _ in 0..settings.two_host_trials {
        tokio::time::sleep(Duration::from_millis(random_ms(2000))).await;
        a.kill9();
        // Sometimes back before its leases expire (it takes them back), sometimes after (B has taken them).
        let down = random_ms(2 * ttl_s * 1000);
        if down < ttl_s * 1000 {
            kills_before_expiry += 1;
        }
        tokio::time::sleep(Duration::from_millis(down)).await;
        a = ChaosHost::spawn(&dirs_a, &wa.url(), "host-a", &env);
        logs.push(a.log.clone());
        a.ready().await;
        let started = Instant::now();
        let (missing, double) = converge(&a, &b, &ids, Duration::from_secs(30), &mut replaced).await;
        settle_times.push(started.elapsed().as_secs_f64());
        not_back += missing as u64;
        api_double += double;
    }
    let max_settle = settle_times.iter().copied().fold(0.0, f64::max);
    c.info("trials (host A SIGKILLed, restarted 0-12 s later; lease ttl 6 s)", settings.two_host_trials);
    c.info("of which A came back before its leases expired", kills_before_expiry);
    let doubled_devices: Vec<String> = wa
        .observations()
        .devices
        .into_values()
        .filter(|d| d.max_concurrent_connections > 1)
        .filter_map(|d| d.tenant)
        .collect();
    c.zero(
        "moments a device had two connections (the server's per-device maximum above 1)",
        doubled_devices.len() as u64,
    );
    c.zero("tenants open on both hosts at one poll of their APIs", api_double);
    c.zero("tenants whose session ended as replaced (440)", replaced.len() as u64);
    c.zero("tenants not open on either host 30 s after A came back", not_back);
    c.info("longest time from A's restart to every tenant open on exactly one host", format!("{max_settle:.2} s"));
    if let Some(first) = doubled_devices.first().cloned().or_else(|| replaced.first().map(|t| t.to_string())) {
        // The whole story of one affected tenant, from every host log, in time order.
        println!("  evidence for {first} (first of {} doubled, {} replaced):", doubled_devices.len(), replaced.len());
        let mut lines: Vec<(String, String)> = Vec::new();
        for log in &logs {
            let name = log.file_name().and_then(|f| f.to_str()).unwrap_or("?").to_string();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let needle = format!("tenant={first} ");
            lines.extend(text.lines().filter(|l| l.contains(&needle)).map(|l| (l.to_string(), name.clone())));
        }
        lines.sort();
        for (line, name) in lines.iter().take(80) {
            println!("    {name}: {line}");
        }
        if let Some(jid) = wa.device_jid(&tid(&first)) {
            let d = wa.device(&jid).unwrap();
            println!(
                "    sim: attempts at {:?} ms, logins {}, replaced_by_newer {}",
                d.attempt_times_ms, d.logins, d.replaced_by_newer
            );
        }
    }
    drop(a);
    drop(b);
    sim.shutdown().await;
    c.finish(&format!("two hosts over one store, one killed and restarted {} times", settings.two_host_trials));
}
