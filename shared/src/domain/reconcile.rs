//! The reconcile decision: what the tenant table wants, against what a host runs, into actions.
//!
//! Pure: the restore and health-sweep functions (and the host's own timer on one machine) gather the inputs,
//! call [`reconcile`], and carry the actions out. Rules that keep it safe:
//! - a host that cannot be reached yields no action at all (a transient failure never marks anyone);
//! - a status is written only when it differs from the stored one (a healthy fleet costs no writes);
//! - a tenant that runs but is not desired is reported, never stopped (an empty or failing table read must
//!   not take the fleet down);
//! - a tenant whose lease another host holds is judged only by that holder's session: a session that lost the
//!   lease (or never had it) yields no status write, failure count or mark.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{Lease, SessionList, SessionState, SessionView, StatusUpdate, TenantId, TenantRecord, UnixMillis};

/// Knobs of the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A session still `connecting` or in `backoff` this long after entering that state is asked to reconnect.
    pub stuck_after_ms: u64,
    /// An alert fires when a tenant's consecutive failures go past this many (and again when it recovers).
    pub alert_after_failures: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self { stuck_after_ms: 5 * 60 * 1000, alert_after_failures: 3 }
    }
}

/// What was learned from the host.
#[derive(Debug, Clone, Copy)]
pub enum HostView<'a> {
    /// The host answered `GET /v1/sessions`.
    Reachable(&'a SessionList),
    /// The host did not answer.
    Unreachable,
}

/// Why an alert fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Alert {
    /// The tenant has failed this many times in a row.
    Failing {
        /// Consecutive failures, including this one.
        consecutive: u32,
    },
    /// The tenant is healthy again after having alerted.
    Recovered,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask the host to run the tenant (it is desired but the host does not hold it).
    Ensure(TenantId),
    /// Ask the host to reconnect a session stuck in `connecting`/`backoff`.
    Reconnect(TenantId),
    /// Write the tenant's status (it differs from the stored one).
    WriteStatus(TenantId, StatusUpdate),
    /// Count one more consecutive failure.
    RecordFailure(TenantId),
    /// Reset the failure count (the tenant is healthy again).
    ResetFailures(TenantId),
    /// Raise an alert.
    Alert(TenantId, Alert),
}

/// The decision for one sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// What to do, grouped per tenant in table order.
    pub actions: Vec<Action>,
    /// The host could not be reached: nothing may be marked; alert and fail the run.
    pub host_unreachable: bool,
    /// The host's boot id differs from the one seen last time.
    pub host_restarted: bool,
    /// Desired tenants whose session is open.
    pub healthy: usize,
    /// Desired tenants whose session is not open.
    pub unhealthy: usize,
    /// Sessions the host runs although the table does not want them (reported only).
    pub undesired_running: usize,
    /// Desired tenants whose lease is held by a session not in the list: left to their holder.
    pub held_elsewhere: usize,
}

impl Plan {
    /// How many actions of a kind the plan holds.
    pub fn count(&self, pred: impl Fn(&Action) -> bool) -> usize {
        self.actions.iter().filter(|a| pred(a)).count()
    }
}

/// The one session each tenant is judged by when several hosts report it (a host that lost the tenant to
/// another still lists its ended session): the session holding the lease the table names, else an open one,
/// else one that believes it holds a lease, else the first reported. So a former holder's `replaced` never
/// outweighs the holder's `open`.
pub fn sessions_by_tenant<'a>(
    desired: &[TenantRecord],
    sessions: &'a [SessionView],
) -> HashMap<&'a TenantId, &'a SessionView> {
    let stored: HashMap<&TenantId, &Lease> =
        desired.iter().filter_map(|r| r.lease.as_ref().map(|l| (&r.tenant_id, l))).collect();
    let rank = |s: &SessionView| match &s.lease {
        _ if stored.get(&s.tenant_id).is_some_and(|st| holds(s, st)) => 3,
        _ if s.state == SessionState::Open => 2,
        Some(l) if l.held => 1,
        _ => 0,
    };
    let mut chosen: HashMap<&TenantId, &SessionView> = HashMap::new();
    for s in sessions {
        match chosen.get(&s.tenant_id) {
            Some(current) if rank(current) >= rank(s) => {}
            _ => {
                chosen.insert(&s.tenant_id, s);
            }
        }
    }
    chosen
}

/// Whether `session` holds `stored` (same owner and epoch, still held).
fn holds(session: &SessionView, stored: &Lease) -> bool {
    session.lease.as_ref().is_some_and(|l| l.held && stored.same_holding(&l.holding()))
}

/// Decides one sweep. `desired` is every tenant record whose desired flag is set; `last_boot_id` is the host's
/// boot id seen by the previous sweep, when known.
pub fn reconcile(
    desired: &[TenantRecord],
    host: HostView<'_>,
    last_boot_id: Option<&str>,
    now: UnixMillis,
    policy: Policy,
) -> Plan {
    let HostView::Reachable(list) = host else {
        return Plan { host_unreachable: true, ..Plan::default() };
    };
    let mut plan = Plan { host_restarted: last_boot_id.is_some_and(|b| b != list.boot_id), ..Plan::default() };
    let running = sessions_by_tenant(desired, &list.sessions);
    for record in desired.iter().filter(|r| r.whatsapp_connected) {
        let id = &record.tenant_id;
        let Some(session) = running.get(id) else {
            plan.unhealthy += 1;
            plan.actions.push(Action::Ensure(id.clone()));
            continue;
        };
        if let Some(stored) = &record.lease
            && !stored.is_released()
            && !holds(session, stored)
        {
            plan.held_elsewhere += 1;
            continue;
        }
        let status = session.state.tenant_status();
        let update = if status.is_terminal() {
            StatusUpdate::terminal(status, session.last_error.clone().unwrap_or_else(|| session.state.as_str().into()))
        } else {
            StatusUpdate { status, reason: None, whatsapp_connected: true }
        };
        if record.differs_from(&update) {
            plan.actions.push(Action::WriteStatus(id.clone(), update));
        }
        match session.state {
            SessionState::Open => {
                plan.healthy += 1;
                if record.consecutive_failures > 0 {
                    plan.actions.push(Action::ResetFailures(id.clone()));
                    if record.consecutive_failures > policy.alert_after_failures {
                        plan.actions.push(Action::Alert(id.clone(), Alert::Recovered));
                    }
                }
            }
            SessionState::Connecting | SessionState::Backoff => {
                plan.unhealthy += 1;
                let consecutive = record.consecutive_failures.saturating_add(1);
                plan.actions.push(Action::RecordFailure(id.clone()));
                if consecutive == policy.alert_after_failures + 1 {
                    plan.actions.push(Action::Alert(id.clone(), Alert::Failing { consecutive }));
                }
                let stuck_for = now.saturating_sub(session.since_ms);
                if stuck_for >= i64::try_from(policy.stuck_after_ms).unwrap_or(i64::MAX) {
                    plan.actions.push(Action::Reconnect(id.clone()));
                }
            }
            // Stopped on request: the operator's choice; terminal states: marked above, need a person.
            _ => plan.unhealthy += 1,
        }
    }
    let wanted: std::collections::HashSet<&TenantId> =
        desired.iter().filter(|r| r.whatsapp_connected).map(|r| &r.tenant_id).collect();
    plan.undesired_running = list
        .sessions
        .iter()
        .filter(|s| !s.state.is_terminal() && s.state != SessionState::Stopped && !wanted.contains(&s.tenant_id))
        .count();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{SessionLease, TenantStatus};

    const NOW: UnixMillis = 10_000_000;

    fn id(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn rec(s: &str, status: Option<TenantStatus>, failures: u32) -> TenantRecord {
        TenantRecord { status, consecutive_failures: failures, ..TenantRecord::desired(id(s)) }
    }

    fn sess(s: &str, state: SessionState, since: UnixMillis) -> SessionView {
        SessionView::new(id(s), state, since)
    }

    fn list(boot: &str, sessions: Vec<SessionView>) -> SessionList {
        SessionList::new(boot, sessions)
    }

    fn run(desired: &[TenantRecord], l: &SessionList, last_boot: Option<&str>) -> Plan {
        reconcile(desired, HostView::Reachable(l), last_boot, NOW, Policy::default())
    }

    #[test]
    fn healthy_fleet_costs_nothing() {
        let desired = vec![rec("a", Some(TenantStatus::Connected), 0), rec("b", Some(TenantStatus::Connected), 0)];
        let l = list("boot1", vec![sess("a", SessionState::Open, 0), sess("b", SessionState::Open, 0)]);
        let plan = run(&desired, &l, Some("boot1"));
        assert!(plan.actions.is_empty(), "{:?}", plan.actions);
        assert_eq!((plan.healthy, plan.unhealthy, plan.host_restarted), (2, 0, false));
    }

    #[test]
    fn first_sight_of_open_writes_connected_once() {
        let desired = vec![rec("a", None, 0)];
        let l = list("b", vec![sess("a", SessionState::Open, 0)]);
        let plan = run(&desired, &l, None);
        assert_eq!(
            plan.actions,
            vec![Action::WriteStatus(
                id("a"),
                StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true }
            )]
        );
    }

    #[test]
    fn host_restarted_and_tenants_absent_are_ensured() {
        let desired = vec![rec("a", Some(TenantStatus::Connected), 0), rec("b", Some(TenantStatus::Connected), 0)];
        let l = list("boot2", vec![]);
        let plan = run(&desired, &l, Some("boot1"));
        assert!(plan.host_restarted);
        assert_eq!(plan.actions, vec![Action::Ensure(id("a")), Action::Ensure(id("b"))]);
        // Absence is not written as disconnected: a host restart is not the tenant's failure.
        assert_eq!(plan.count(|a| matches!(a, Action::WriteStatus(..))), 0);
    }

    #[test]
    fn running_but_not_desired_is_only_reported() {
        let l = list("b", vec![sess("x", SessionState::Open, 0), sess("y", SessionState::Replaced, 0)]);
        let plan = run(&[], &l, None);
        assert!(plan.actions.is_empty());
        assert_eq!(plan.undesired_running, 1);
    }

    #[test]
    fn not_desired_records_are_ignored() {
        let mut r = rec("a", Some(TenantStatus::Replaced), 0);
        r.whatsapp_connected = false;
        let plan = run(&[r], &list("b", vec![]), None);
        assert!(plan.actions.is_empty());
    }

    #[test]
    fn stuck_in_backoff_counts_alerts_and_reconnects() {
        let since = NOW - 6 * 60 * 1000;
        let desired = vec![rec("a", Some(TenantStatus::Connecting), 3)];
        let l = list("b", vec![sess("a", SessionState::Backoff, since)]);
        let plan = run(&desired, &l, None);
        assert_eq!(
            plan.actions,
            vec![
                Action::RecordFailure(id("a")),
                Action::Alert(id("a"), Alert::Failing { consecutive: 4 }),
                Action::Reconnect(id("a")),
            ]
        );
    }

    #[test]
    fn briefly_in_backoff_counts_without_reconnect_or_alert() {
        let desired = vec![rec("a", Some(TenantStatus::Connecting), 0)];
        let l = list("b", vec![sess("a", SessionState::Backoff, NOW - 1000)]);
        assert_eq!(run(&desired, &l, None).actions, vec![Action::RecordFailure(id("a"))]);
    }

    #[test]
    fn alert_fires_once_when_crossing() {
        let desired = vec![rec("a", Some(TenantStatus::Connecting), 5)];
        let l = list("b", vec![sess("a", SessionState::Connecting, NOW)]);
        assert_eq!(run(&desired, &l, None).count(|a| matches!(a, Action::Alert(..))), 0);
    }

    #[test]
    fn recovery_resets_and_alerts_after_alerting() {
        let desired = vec![rec("a", Some(TenantStatus::Connecting), 4), rec("b", Some(TenantStatus::Connected), 2)];
        let l = list("b", vec![sess("a", SessionState::Open, NOW), sess("b", SessionState::Open, NOW)]);
        let plan = run(&desired, &l, None);
        assert_eq!(
            plan.actions,
            vec![
                Action::WriteStatus(
                    id("a"),
                    StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true }
                ),
                Action::ResetFailures(id("a")),
                Action::Alert(id("a"), Alert::Recovered),
                Action::ResetFailures(id("b")),
            ]
        );
    }

    #[test]
    fn terminal_states_are_marked_with_reason_and_desire_cleared() {
        let desired = vec![rec("a", Some(TenantStatus::Connected), 0)];
        let mut s = sess("a", SessionState::Replaced, NOW);
        s.last_error = Some("stream replaced (440)".into());
        let plan = run(&desired, &list("b", vec![s]), None);
        assert_eq!(
            plan.actions,
            vec![Action::WriteStatus(id("a"), StatusUpdate::terminal(TenantStatus::Replaced, "stream replaced (440)"))]
        );
        assert_eq!(plan.unhealthy, 1);
    }

    #[test]
    fn host_unreachable_marks_nothing() {
        let desired = vec![rec("a", Some(TenantStatus::Connected), 0)];
        let plan = reconcile(&desired, HostView::Unreachable, Some("x"), NOW, Policy::default());
        assert!(plan.host_unreachable);
        assert!(plan.actions.is_empty());
    }

    #[test]
    fn ten_thousand_tenants_decide_in_one_pass() {
        let desired: Vec<_> = (0..10_000).map(|i| rec(&format!("t{i}"), Some(TenantStatus::Connected), 0)).collect();
        let sessions = (0..10_000).map(|i| sess(&format!("t{i}"), SessionState::Open, 0)).collect();
        let plan = run(&desired, &list("b", sessions), Some("b"));
        assert_eq!(plan.healthy, 10_000);
        assert!(plan.actions.is_empty());
    }

    /// A record whose lease `owner` holds at `epoch`.
    fn leased(s: &str, owner: &str, epoch: u64, released: bool) -> TenantRecord {
        let expires_at = if released { 0 } else { NOW + 10_000 };
        let lease = Lease { owner: owner.into(), epoch, version: 1, expires_at };
        TenantRecord { lease: Some(lease), ..rec(s, Some(TenantStatus::Connected), 0) }
    }

    /// A session of `owner`'s holding `epoch` (held now or not).
    fn on(mut s: SessionView, owner: &str, epoch: u64, held: bool) -> SessionView {
        s.lease = Some(SessionLease { owner: owner.into(), epoch, held });
        s
    }

    #[test]
    fn a_former_holders_ended_session_marks_nothing_while_another_holds_the_lease() {
        let desired = vec![leased("a", "host-b", 2, false)];
        let mut replaced = on(sess("a", SessionState::Replaced, NOW), "host-a", 1, false);
        replaced.last_error = Some("stream replaced (440)".into());
        let plan = run(&desired, &list("boot-a", vec![replaced.clone()]), None);
        assert!(plan.actions.is_empty(), "the former holder's view decides nothing: {:?}", plan.actions);
        assert_eq!(plan.held_elsewhere, 1);

        let open = on(sess("a", SessionState::Open, 0), "host-b", 2, true);
        for sessions in [vec![replaced.clone(), open.clone()], vec![open.clone(), replaced.clone()]] {
            let plan = run(&desired, &list("boot-a,boot-b", sessions), None);
            assert!(plan.actions.is_empty(), "the holder's open session is the one judged: {:?}", plan.actions);
            assert_eq!((plan.healthy, plan.unhealthy), (1, 0));
        }
    }

    #[test]
    fn a_session_waiting_for_anothers_lease_counts_no_failure() {
        let desired = vec![leased("a", "host-b", 2, false)];
        let mut waiting = sess("a", SessionState::Backoff, NOW - 3_600_000);
        waiting.last_error = Some("lease held by another host".into());
        let plan = run(&desired, &list("boot-a", vec![waiting]), None);
        assert!(plan.actions.is_empty(), "no failure count, no reconnect: {:?}", plan.actions);
    }

    #[test]
    fn the_last_holder_marks_after_releasing_the_lease() {
        let desired = vec![leased("a", "host-a", 3, true)];
        let mut ended = on(sess("a", SessionState::LoggedOut, NOW), "host-a", 3, false);
        ended.last_error = Some("logged out (401)".into());
        let plan = run(&desired, &list("boot-a", vec![ended]), None);
        assert_eq!(
            plan.actions,
            vec![Action::WriteStatus(id("a"), StatusUpdate::terminal(TenantStatus::LoggedOut, "logged out (401)"))]
        );
    }
}
