//! Whether this host's data key is the one that sealed the credentials it is asked to run.
//!
//! A host started with another key (a typo in a secret, a rotated key given to only some hosts) cannot read
//! what the others stored. That is the host's fault, never the tenants': their credentials are fine under the
//! right key. So a tenant refused for its key is neither marked nor un-desired nor written; the refusal is
//! counted here, logged once per key that sealed such tenants (by fingerprint only), exported as a gauge, and
//! reported as a host-level error on `/health`, in `GET /v1/sessions` (from which the sweep raises one
//! `alert.host_error`), and on `/ready`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use wakeeper_shared::domain::{HostCondition, TenantId};

use crate::readiness::Condition;

/// The code of the condition, on every surface.
pub const DATA_KEY_MISMATCH: &str = "data_key_mismatch";

/// The tenants currently refused for their key, by the fingerprint of the key that sealed them.
#[derive(Default)]
pub struct KeyCheck {
    inner: Mutex<Inner>,
    /// The readiness condition `data_key_verified`, once the host's readiness exists.
    ready: std::sync::OnceLock<Condition>,
}

impl std::fmt::Debug for KeyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCheck").field("refused", &self.refused_count()).finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Tenant -> fingerprint of the key that sealed its records.
    refused: BTreeMap<TenantId, String>,
    /// This host's key fingerprint, as the store reported it.
    holds: Option<String>,
    /// Sealing keys already logged.
    logged: BTreeSet<String>,
}

impl KeyCheck {
    /// A check with nothing refused.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reports to `condition` from now on: failing, with the condition's message, while any tenant is refused.
    pub fn report_to(&self, condition: Condition) {
        condition.set_ok();
        if self.ready.set(condition).is_ok() {
            self.publish();
        }
    }

    /// `tenant`'s records were sealed with `sealed_with`, a key this host (holding `holds`) does not have.
    pub fn refused(&self, tenant: &TenantId, sealed_with: &str, holds: &str) {
        let mut inner = self.inner.lock().expect("key check lock");
        inner.holds = Some(holds.to_owned());
        if inner.logged.insert(sealed_with.to_owned()) {
            tracing::error!(
                tenant = %tenant,
                sealed_with,
                holds,
                "credentials were sealed with a data key this host does not hold: give it that key \
                 (WAKEEPER_DATA_KEY, WAKEEPER_KEY_FILE or WAKEEPER_DATA_KEY_KMS), or keep the old one as \
                 WAKEEPER_DATA_KEY_PREVIOUS while rotating; no tenant is marked meanwhile"
            );
        }
        inner.refused.insert(tenant.clone(), sealed_with.to_owned());
        Self::export(&inner);
        drop(inner);
        self.publish();
    }

    /// `tenant` opened with this host's key (or left this host): it no longer counts.
    pub fn opened(&self, tenant: &TenantId) {
        let mut inner = self.inner.lock().expect("key check lock");
        if inner.refused.remove(tenant).is_some() {
            Self::export(&inner);
            drop(inner);
            self.publish();
        }
    }

    /// Sets the readiness condition from what is refused now.
    fn publish(&self) {
        if let Some(ready) = self.ready.get() {
            match self.condition() {
                Some(c) => ready.set_failing(c.message),
                None => ready.set_ok(),
            }
        }
    }

    /// How many tenants are refused for their key now.
    pub fn refused_count(&self) -> usize {
        self.inner.lock().expect("key check lock").refused.len()
    }

    /// The host-level condition while any tenant is refused.
    pub fn condition(&self) -> Option<HostCondition> {
        let inner = self.inner.lock().expect("key check lock");
        if inner.refused.is_empty() {
            return None;
        }
        let keys: BTreeSet<&str> = inner.refused.values().map(String::as_str).collect();
        let keys: Vec<&str> = keys.into_iter().collect();
        Some(HostCondition {
            code: DATA_KEY_MISMATCH.into(),
            message: format!(
                "{} tenant(s) sealed with data key {} which this host (key {}) does not hold; nothing is marked",
                inner.refused.len(),
                keys.join(", "),
                inner.holds.as_deref().unwrap_or("?"),
            ),
        })
    }

    fn export(inner: &Inner) {
        metrics::gauge!("wakeeper_data_key_mismatch_tenants").set(inner.refused.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_lasts_until_the_tenant_opens_and_names_keys_only() {
        let check = KeyCheck::new();
        let (a, b) = (TenantId::parse("a").unwrap(), TenantId::parse("b").unwrap());
        assert!(check.condition().is_none());
        check.refused(&a, "00112233aabbccdd", "ffeeddccbbaa9988");
        check.refused(&b, "00112233aabbccdd", "ffeeddccbbaa9988");
        let c = check.condition().expect("a condition while tenants are refused");
        assert_eq!(c.code, DATA_KEY_MISMATCH);
        assert!(c.message.contains("2 tenant(s)") && c.message.contains("00112233aabbccdd"), "{}", c.message);
        check.opened(&a);
        assert_eq!(check.refused_count(), 1);
        check.opened(&b);
        assert!(check.condition().is_none());
    }

    #[test]
    fn readiness_fails_while_a_tenant_is_refused() {
        let readiness = crate::readiness::Readiness::new();
        let check = KeyCheck::new();
        check.report_to(readiness.condition(crate::readiness::DATA_KEY_VERIFIED));
        assert!(readiness.is_ready());
        let a = TenantId::parse("a").unwrap();
        check.refused(&a, "00112233aabbccdd", "ffeeddccbbaa9988");
        let view = readiness.view();
        assert!(!view.ready);
        assert!(view.conditions[0].reason.as_deref().unwrap().contains("00112233aabbccdd"));
        check.opened(&a);
        assert!(readiness.is_ready());
    }
}
