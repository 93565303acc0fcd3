//! The host's Prometheus metrics as scrapers expect them: every series has HELP and TYPE lines, histograms
//! are real histograms (buckets chosen for their unit), process metrics (RSS, CPU, open files) are collected at
//! each scrape, and every series is on `/metrics` from the start (at zero, for each known label value), so a
//! rate or an alert works before the first event.
//!
//! [`SERIES`] is the list of the host's own series; the README's metrics table and the scrape test
//! (`tests/metrics_scrape.rs`) follow it.

use metrics::Unit;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Counter,
    Gauge,
    /// With the bucket bounds it is exported with.
    Histogram(&'static [f64]),
}

/// One series of the host's: its name, kind, unit, help text, and the label (with its known values) it is
/// registered under at start (`None`: no label, or labels only known when they happen).
pub struct Series {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Unit,
    pub help: &'static str,
    pub label: Option<(&'static str, &'static [&'static str])>,
}

/// Reconnects take from a few milliseconds (a restart-required stream error) to minutes (backoff after 429).
const RECONNECT_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];
/// A commit's lag is its oldest change's age: tens of milliseconds when healthy, seconds under a store outage.
const COMMIT_LAG_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The wire names of [`wakeeper_shared::domain::SessionState::ALL`] (a test keeps them equal).
const STATES: &[&str] = &[
    "linking",
    "connecting",
    "open",
    "backoff",
    "stopped",
    "logged_out",
    "replaced",
    "banned",
    "credentials_missing",
    "credentials_corrupt",
];

const fn counter(name: &'static str, help: &'static str) -> Series {
    Series { name, kind: Kind::Counter, unit: Unit::Count, help, label: None }
}

const fn gauge(name: &'static str, unit: Unit, help: &'static str) -> Series {
    Series { name, kind: Kind::Gauge, unit, help, label: None }
}

const fn labelled(mut s: Series, label: &'static str, values: &'static [&'static str]) -> Series {
    s.label = Some((label, values));
    s
}

/// Every series the host exports (besides the `process_*` ones).
pub const SERIES: &[Series] = &[
    // Sessions
    labelled(gauge("wakeeper_sessions", Unit::Count, "Sessions on this host, by state."), "state", STATES),
    counter("wakeeper_sessions_started_total", "Sessions started (restored, ensured or linked)."),
    counter("wakeeper_connects_attempted_total", "Connection attempts to WhatsApp."),
    counter("wakeeper_connects_succeeded_total", "Connection attempts that reached connected."),
    labelled(
        counter("wakeeper_connects_failed_total", "Connection attempts that failed and will be retried, by reason."),
        "reason",
        &["transient", "rate_limited"],
    ),
    counter("wakeeper_half_open_detected_total", "Sockets found dead by the keepalive and replaced."),
    Series {
        name: "wakeeper_reconnect_seconds",
        kind: Kind::Histogram(RECONNECT_BUCKETS),
        unit: Unit::Seconds,
        help: "From losing a connection to being connected again.",
        label: None,
    },
    counter("wakeeper_governor_grants_total", "Connect slots granted by the connect governor."),
    counter("wakeeper_governor_waits_total", "Connects that had to wait for a governor slot."),
    counter("wakeeper_links_started_total", "Link (QR or pairing code) attempts started."),
    labelled(
        counter("wakeeper_links_ended_total", "Link attempts ended, by status."),
        "status",
        &["paired", "expired", "failed", "cancelled"],
    ),
    // Leases and marks
    counter("wakeeper_lease_renewals_total", "Tenant leases renewed."),
    counter("wakeeper_lease_losses_total", "Tenant leases lost: another host owns the tenant now."),
    counter("wakeeper_lease_takeovers_total", "Expired leases of other hosts taken over."),
    counter("wakeeper_marks_skipped_not_holder_total", "Tenant marks not written because this host held no lease."),
    // Replication
    counter("wakeeper_replication_commits_total", "Credential batches committed to the credential store."),
    counter("wakeeper_replication_writes_total", "Credential records written to the credential store."),
    counter("wakeeper_replication_failures_total", "Credential batch commits that failed (retried)."),
    counter("wakeeper_replication_fenced_total", "Credential batches refused: a newer owner's epoch exists."),
    gauge("wakeeper_replication_pending_tenants", Unit::Count, "Tenants with changes not yet committed."),
    gauge("wakeeper_replication_queue_depth", Unit::Count, "Changes not yet committed."),
    gauge("wakeeper_replication_in_flight", Unit::Count, "Batch commits in flight."),
    gauge("wakeeper_replication_lag_seconds", Unit::Seconds, "Age of the oldest change not yet committed."),
    Series {
        name: "wakeeper_replication_commit_lag_seconds",
        kind: Kind::Histogram(COMMIT_LAG_BUCKETS),
        unit: Unit::Seconds,
        help: "Age of each committed batch's oldest change when the commit was acknowledged.",
        label: None,
    },
    // Messages, outbox and webhooks
    counter("wakeeper_messages_received_total", "Inbound messages taken into the outbox."),
    counter("wakeeper_messages_sent_total", "Outbound messages sent for the bot."),
    counter("wakeeper_messages_send_failed_total", "Outbound messages that could not be sent."),
    gauge("wakeeper_outbox_events", Unit::Count, "Inbound message events waiting in the outbox."),
    counter("wakeeper_outbox_delivered_total", "Outbox events delivered, once per webhook URL."),
    counter("wakeeper_outbox_retries_total", "Outbox delivery attempts that failed and will be retried."),
    counter("wakeeper_outbox_dropped_total", "Outbox events dropped past the outbox's limit."),
    counter("wakeeper_webhook_delivered_total", "State events delivered to a webhook URL."),
    counter("wakeeper_webhook_retries_total", "State event deliveries that failed and will be retried."),
    counter("wakeeper_webhook_dropped_total", "State events dropped past a URL's queue limit."),
    counter("wakeeper_webhook_dead_letters_total", "Events a webhook URL refused for good, kept as dead letters."),
    // Host health
    gauge("wakeeper_ready", Unit::Count, "1 when /ready answers 200, else 0."),
    labelled(
        counter("wakeeper_disk_faults_total", "Disk faults seen on the data dir, by kind."),
        "kind",
        &["full", "unavailable"],
    ),
    labelled(
        gauge("wakeeper_disk_fault", Unit::Count, "1 while a path under the data dir has a disk fault."),
        "path",
        &[],
    ),
    gauge("wakeeper_data_key_mismatch_tenants", Unit::Count, "Tenants whose records are sealed under another key."),
];

/// Installs the global recorder: buckets for the histograms, HELP for every series, every series registered.
pub fn install() -> Result<Metrics, BuildError> {
    let mut builder = PrometheusBuilder::new();
    for s in SERIES {
        if let Kind::Histogram(buckets) = s.kind {
            builder = builder.set_buckets_for_metric(Matcher::Full(s.name.into()), buckets)?;
        }
    }
    let handle = builder.install_recorder()?;
    register();
    let process = metrics_process::Collector::default();
    process.describe();
    Ok(Metrics { handle, process })
}

/// Describes every series and registers it at zero (each known label value once); needs the recorder.
fn register() {
    for s in SERIES {
        match s.kind {
            Kind::Counter => metrics::describe_counter!(s.name, s.unit, s.help),
            Kind::Gauge => metrics::describe_gauge!(s.name, s.unit, s.help),
            Kind::Histogram(_) => metrics::describe_histogram!(s.name, s.unit, s.help),
        }
        let labels: Vec<Vec<(&'static str, &'static str)>> = match s.label {
            // No known values (a per-path gauge): no series until one happens.
            Some((key, values)) => values.iter().map(|v| vec![(key, *v)]).collect(),
            None => vec![Vec::new()],
        };
        for l in labels {
            match s.kind {
                Kind::Counter => metrics::counter!(s.name, &l).increment(0),
                Kind::Gauge => metrics::gauge!(s.name, &l).increment(0.0),
                // A histogram shows its buckets (all zero) once it exists; touching it records nothing.
                Kind::Histogram(_) => drop(metrics::histogram!(s.name, &l)),
            }
        }
    }
}

/// The recorder's handle and the process collector: [`Metrics::render`] is what `/metrics` answers.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

impl Metrics {
    /// The exposition text, with the process metrics read now.
    pub fn render(&self) -> String {
        self.process.collect();
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use wakeeper_shared::domain::SessionState;

    use super::*;

    #[test]
    fn the_state_labels_are_the_session_states() {
        let all: Vec<&str> = SessionState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(STATES, all.as_slice());
    }

    #[test]
    fn every_series_is_named_and_described_once() {
        let mut names: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "a series is listed twice");
        for s in SERIES {
            assert!(s.name.starts_with("wakeeper_") && !s.help.is_empty(), "{}", s.name);
            assert_eq!(
                s.name.ends_with("_total"),
                s.kind == Kind::Counter,
                "{}: counters and only they end in _total",
                s.name
            );
        }
    }
}
