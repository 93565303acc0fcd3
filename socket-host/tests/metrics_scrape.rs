//! `/metrics` as Prometheus scrapes it (issue 21): the host binary with two tenants on the fake server, one of
//! them reconnected after its socket dropped. Every documented series has HELP and TYPE lines and a plausible
//! value, the histograms are histograms, the process metrics are there, and the README lists every series.

use std::collections::BTreeMap;
use std::time::Duration;

use socket_host::telemetry::{Kind, SERIES};
use wa_sim::Target;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

/// One scrape: sample lines by series name with their labels, plus the HELP and TYPE lines.
#[derive(Default)]
struct Scrape {
    help: BTreeMap<String, String>,
    kind: BTreeMap<String, String>,
    samples: Vec<(String, String, f64)>,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut s = Scrape::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                s.help.insert(name.into(), help.into());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
                s.kind.insert(name.into(), kind.into());
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
                let (name, labels) = match series.split_once('{') {
                    Some((n, l)) => (n, l.trim_end_matches('}')),
                    None => (series, ""),
                };
                let value = value.parse().unwrap_or_else(|_| panic!("a number in {line:?}"));
                s.samples.push((name.into(), labels.into(), value));
            }
        }
        s
    }

    /// The value of `name` with exactly `labels` (`""` for none).
    fn value(&self, name: &str, labels: &str) -> f64 {
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|(_, _, v)| *v)
            .unwrap_or_else(|| panic!("no sample {name}{{{labels}}}"))
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }
}

async fn scrape(host: &TestHost) -> Scrape {
    let res = reqwest::Client::new()
        .get(format!("{}/metrics", host.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("/metrics answers");
    assert_eq!(res.status(), 200);
    let ctype = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "exposition format content type: {ctype}");
    Scrape::parse(&res.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_host_exports_every_documented_series_with_help_type_and_a_plausible_value() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let tenants = [tid("metrics-0"), tid("metrics-1")];
    seed_embedded(&dirs, &wa, &tenants).await;
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "metrics-a", &[]);
    host.ready().await;
    host.all_open(2, Duration::from_secs(60)).await;
    // One reconnect, so the reconnect histogram has a sample.
    let device = wa.device_jid(&tenants[0]).unwrap();
    assert_eq!(wa.drop_connections(&Target::device(&device)), 1);
    wa.wait_for_device(&device, Duration::from_secs(30), |o| o.logins >= 2).await.unwrap();
    host.all_open(2, Duration::from_secs(30)).await;
    // A contact's message changes the device's Signal state: a credential write to replicate.
    wa.add_contact("4915100000001").unwrap();
    let msg = wa.contact_send_text("4915100000001", &device, "hello").await.unwrap();
    wa.wait_for_receipt("4915100000001", Duration::from_secs(30), |r| r.message_id == msg).await.unwrap();
    let m = wait_until(Duration::from_secs(10), "the reconnect and a commit on /metrics", || async {
        let m = scrape(&host).await;
        let done = m.value("wakeeper_reconnect_seconds_count", "") >= 1.0
            && m.value("wakeeper_replication_commits_total", "") >= 1.0;
        done.then_some(m)
    })
    .await;

    for s in SERIES {
        if s.name == "wakeeper_disk_fault" {
            // A per-path gauge: no series (so no HELP either) until a path has a fault.
            assert!(!m.has(s.name), "no disk fault in this run");
            continue;
        }
        let help = m.help.get(s.name).unwrap_or_else(|| panic!("no HELP for {}", s.name));
        assert_eq!(help, s.help, "{}", s.name);
        let want = match s.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram(_) => "histogram",
        };
        assert_eq!(m.kind.get(s.name).map(String::as_str), Some(want), "TYPE of {}", s.name);
        match (s.kind, s.label) {
            (Kind::Histogram(buckets), _) => {
                let bucket = format!("{}_bucket", s.name);
                let les = m.samples.iter().filter(|(n, _, _)| *n == bucket).count();
                assert_eq!(les, buckets.len() + 1, "{}: one line per bucket and +Inf", s.name);
                assert!(m.has(&format!("{}_sum", s.name)) && m.has(&format!("{}_count", s.name)), "{}", s.name);
                assert!(!m.samples.iter().any(|(n, l, _)| n == s.name && l.contains("quantile")), "not a summary");
            }
            (_, Some((key, values))) => {
                for v in values {
                    m.value(s.name, &format!("{key}=\"{v}\""));
                }
            }
            _ => assert!(m.value(s.name, "") >= 0.0, "{}", s.name),
        }
    }

    // Plausible values of what this run did.
    assert_eq!(m.value("wakeeper_sessions", "state=\"open\""), 2.0);
    assert_eq!(m.value("wakeeper_sessions", "state=\"logged_out\""), 0.0);
    assert!(m.value("wakeeper_connects_attempted_total", "") >= 3.0);
    assert!(m.value("wakeeper_connects_succeeded_total", "") >= 3.0);
    assert!(m.value("wakeeper_governor_grants_total", "") >= 3.0);
    assert!(m.value("wakeeper_sessions_started_total", "") >= 2.0);
    assert!(m.value("wakeeper_replication_commits_total", "") >= 1.0, "the embedded store took batches");
    assert_eq!(m.value("wakeeper_replication_fenced_total", ""), 0.0);
    assert_eq!(m.value("wakeeper_ready", ""), 1.0);
    let reconnect = m.value("wakeeper_reconnect_seconds_sum", "");
    assert!(reconnect > 0.0 && reconnect < 30.0, "reconnect took {reconnect} s in all");
    assert_eq!(
        m.value("wakeeper_reconnect_seconds_bucket", "le=\"+Inf\""),
        m.value("wakeeper_reconnect_seconds_count", "")
    );

    // Process metrics, read at the scrape.
    let rss = m.value("process_resident_memory_bytes", "");
    assert!(rss > 1e6 && rss < 4e9, "RSS {rss}");
    let fds = m.value("process_open_fds", "");
    assert!(fds >= 5.0 && fds <= m.value("process_max_fds", ""), "open fds {fds}");
    // Whole seconds (metrics' counters are integers): a host this young may show 0.
    assert!(m.value("process_cpu_seconds_total", "") >= 0.0);
    let started = m.value("process_start_time_seconds", "");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(started > now - 600.0 && started <= now + 1.0, "start time {started} (now {now})");
    assert!(m.value("process_threads", "") >= 2.0);
    assert_eq!(m.kind.get("process_cpu_seconds_total").map(String::as_str), Some("counter"));

    // The README documents every series.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let missing: Vec<_> = SERIES.iter().map(|s| s.name).filter(|n| !readme.contains(&format!("`{n}`"))).collect();
    assert!(missing.is_empty(), "README does not list {missing:?}");
    drop(host);
    sim.shutdown().await;
}
