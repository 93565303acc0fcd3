//! Scenario 3: the fake server answering 503 and 429 to every connect: tenants wrongly marked, the peak connect
//! rate the server saw against the governor's limit, time to full recovery.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;
use wa_sim::{Refusal, RefusePoint, Target};
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::domain::TenantId;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_are_paced_and_mark_nobody() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(360) + settings.refusal * 3;
    tokio::time::timeout(limit, refusals(&settings)).await.expect("chaos scenario timed out");
}

async fn refusals(settings: &Settings) {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let ids: Vec<TenantId> = (0..30).map(|i| tid(&format!("refused-{i:02}"))).collect();
    seed_embedded(&dirs, &wa, &ids).await;
    let (rate, burst) = (20u32, 5u32);
    let mut host = ChaosHost::spawn(
        &dirs,
        &wa.url(),
        "host-a",
        &[("WAKEEPER_CONNECT_RATE", rate.to_string()), ("WAKEEPER_CONNECT_BURST", burst.to_string())],
    );
    host.ready().await;
    assert_eq!(wait_open(&host, &ids, Duration::from_secs(60)).await, 0, "set-up: every tenant open");
    let mut c = Counts::default();
    let mut wrongly_marked: BTreeSet<TenantId> = BTreeSet::new();
    let mut peak_overall = 0u32;
    let host_env = [("WAKEEPER_CONNECT_RATE", rate.to_string()), ("WAKEEPER_CONNECT_BURST", burst.to_string())];
    for (phase, (code, point)) in
        [(503u16, RefusePoint::Upgrade), (429, RefusePoint::Stream), (429, RefusePoint::Upgrade)]
            .into_iter()
            .enumerate()
    {
        if phase > 0 {
            // A fresh host per fault: failures from the previous fault would otherwise still count (a session
            // resets its failure count only after a minute open), and lengthen this one's backoff.
            host.terminate(Duration::from_secs(30));
            host = ChaosHost::spawn(&dirs, &wa.url(), "host-a", &host_env);
            host.ready().await;
            assert_eq!(wait_open(&host, &ids, Duration::from_secs(60)).await, 0, "every tenant open again");
        }
        let label = format!("{code} at the {}", if point == RefusePoint::Upgrade { "upgrade" } else { "stream" });
        let seconds_before = wa.attempts_per_second().len();
        let attempts_before = wa.summary().connect_attempts;
        wa.refuse_connects(&Target::All, Refusal { code, point, duration: settings.refusal }).unwrap();
        assert_eq!(wa.drop_connections(&Target::All), ids.len(), "every tenant was connected");
        let started = Instant::now();
        while started.elapsed() < settings.refusal {
            wrongly_marked.extend(terminal_in(&states(&host).await));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let attempts = wa.summary().connect_attempts - attempts_before;
        let ended = Instant::now();
        let not_open = wait_open(&host, &ids, Duration::from_secs(150)).await;
        let recovery = ended.elapsed();
        let series = wa.attempts_per_second();
        let peak = series[seconds_before.saturating_sub(1)..].iter().copied().max().unwrap_or(0);
        peak_overall = peak_overall.max(peak);
        wrongly_marked.extend(terminal_in(&states(&host).await));
        c.info(
            &format!("({label}) connect attempts per tenant during the {:?} refusal", settings.refusal),
            format!("{:.1}", attempts as f64 / ids.len() as f64),
        );
        c.bound(
            &format!("({label}) peak connects/s seen by the server (limit {rate}/s + burst {burst})"),
            peak,
            peak <= rate + burst,
        );
        c.zero(&format!("({label}) tenants not open after the refusal ended"), not_open as u64);
        c.info(
            &format!("({label}) time from the end of the refusal to every tenant open"),
            format!("{:.2} s", recovery.as_secs_f64()),
        );
    }
    host.terminate(Duration::from_secs(30));
    let tenants = EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap();
    wrongly_marked.extend(super::fleet::marked_in_table(&tenants, &ids).await);
    c.zero(
        "tenants wrongly marked (a terminal state seen, or marked in the tenant table)",
        wrongly_marked.len() as u64,
    );
    c.zero("devices connected twice at once", doubled(&wa));
    c.info("peak connects/s over the whole scenario", peak_overall);
    sim.shutdown().await;
    c.finish("the server refusing every connect with 503 and 429");
}
