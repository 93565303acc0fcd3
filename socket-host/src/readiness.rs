//! Readiness: whether the host should be sent work now, as opposed to `/health`, which only says it is alive.
//!
//! Readiness is a small registry of named conditions. Whoever owns a condition takes a [`Condition`] handle
//! once ([`Readiness::condition`]) and sets it ok or failing (with a reason) as things change; the host is
//! ready when every condition is ok. `GET /ready` (no token, like `/health`) answers
//! `200 {"ready": true, "conditions": [...]}` or `503` with the same body and `ready: false`, each condition
//! as `{name, ok, reason}`; the gauge `wakeeper_ready` is 1 or 0.
//!
//! The host's own conditions: [`RESTORE_FINISHED`] (restore on start has handed every desired tenant to its
//! session), [`DISK_WRITABLE`] (no local disk fault, see [`crate::disk_health`]) and [`DATA_KEY_VERIFIED`]
//! (no tenant sealed with another data key, see [`crate::key_check`]), and `stores_reachable` (both stores
//! answered since start, see [`crate::store_probe`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::api::AppState;

/// Restore on start has handed every desired tenant to its session (ok at once when it is off).
pub const RESTORE_FINISHED: &str = "restore_finished";
/// Every local path the host writes takes writes (the store, the outbox, the working copies).
pub const DISK_WRITABLE: &str = "disk_writable";
/// No tenant was refused for being sealed with a data key this host does not hold (see [`crate::key_check`]).
pub const DATA_KEY_VERIFIED: &str = "data_key_verified";

/// The host's readiness conditions. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, Option<String>>>>,
}

/// One condition of a [`Readiness`]: set ok or failing by its owner.
#[derive(Clone)]
pub struct Condition {
    name: &'static str,
    readiness: Readiness,
}

/// One condition as `/ready` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ConditionView {
    /// The condition's name.
    pub name: &'static str,
    /// Whether it holds.
    pub ok: bool,
    /// Why not, in words (never a secret); absent when ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The body of `GET /ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReadyView {
    /// Every condition holds.
    pub ready: bool,
    /// Every condition, by name.
    pub conditions: Vec<ConditionView>,
}

impl Readiness {
    /// A registry with no condition (ready).
    pub fn new() -> Self {
        Self::default()
    }

    /// The condition `name`, registered as failing ("not checked yet") until its owner says otherwise. Taking
    /// the same name again returns a handle on the same condition.
    pub fn condition(&self, name: &'static str) -> Condition {
        self.lock().entry(name).or_insert_with(|| Some("not checked yet".into()));
        self.publish();
        Condition { name, readiness: self.clone() }
    }

    /// Whether every condition holds.
    pub fn is_ready(&self) -> bool {
        self.lock().values().all(Option::is_none)
    }

    /// Every condition, for `/ready`.
    pub fn view(&self) -> ReadyView {
        let conditions: Vec<ConditionView> = self
            .lock()
            .iter()
            .map(|(name, failing)| ConditionView { name, ok: failing.is_none(), reason: failing.clone() })
            .collect();
        ReadyView { ready: conditions.iter().all(|c| c.ok), conditions }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Option<String>>> {
        self.conditions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, name: &'static str, failing: Option<String>) {
        self.lock().insert(name, failing);
        self.publish();
    }

    fn publish(&self) {
        metrics::gauge!("wakeeper_ready").set(if self.is_ready() { 1.0 } else { 0.0 });
    }
}

impl Condition {
    /// The condition holds.
    pub fn set_ok(&self) {
        self.readiness.set(self.name, None);
    }

    /// The condition does not hold, because of `reason` (words for a person; never a secret).
    pub fn set_failing(&self, reason: impl Into<String>) {
        self.readiness.set(self.name, Some(reason.into()));
    }

    /// The condition's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// `GET /ready`.
#[utoipa::path(get, path = "/ready", tag = "health",
    responses(
        (status = 200, description = "Every condition holds.", body = ReadyView),
        (status = 503, description = "A condition fails (see its `reason`).", body = ReadyView),
    ))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let view = state.readiness.view();
    let status = if view.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, [(header::CACHE_CONTROL, "no-store")], Json(view)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_holds() {
        let r = Readiness::new();
        assert!(r.is_ready(), "no condition: ready");
        let disk = r.condition(DISK_WRITABLE);
        let restore = r.condition(RESTORE_FINISHED);
        assert!(!r.is_ready(), "new conditions fail until checked");
        disk.set_ok();
        restore.set_ok();
        assert!(r.is_ready());
        disk.set_failing("store.redb: disk full");
        let view = r.view();
        assert!(!view.ready);
        assert_eq!(
            view.conditions,
            [
                ConditionView { name: DISK_WRITABLE, ok: false, reason: Some("store.redb: disk full".into()) },
                ConditionView { name: RESTORE_FINISHED, ok: true, reason: None },
            ]
        );
        // Another owner's condition is added later without touching these.
        let other = r.condition("stores_reachable");
        assert_eq!(r.view().conditions.len(), 3);
        other.set_ok();
        disk.set_ok();
        assert!(r.is_ready());
        assert_eq!(r.condition(DISK_WRITABLE).name(), DISK_WRITABLE);
        assert!(r.is_ready(), "taking a condition again keeps its state");
    }
}
