//! One lock per tenant around the steps that take its lease outside a running session (ensure, link, logout).
//!
//! Two such steps for one tenant would each take the lease: the second acquisition (same owner, so granted at
//! once, with a higher epoch) fences the first one's session, whose pending batches are then refused and whose
//! working copy is discarded. A gate makes them queue instead. Entries exist only while someone holds or waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use wakeeper_shared::domain::TenantId;

type Lock = Arc<tokio::sync::Mutex<()>>;

/// The gates of every tenant.
#[derive(Default)]
pub(crate) struct TenantGates {
    locks: Mutex<HashMap<TenantId, Lock>>,
}

/// A tenant's gate, held until dropped.
pub(crate) struct Gate<'a> {
    gates: &'a TenantGates,
    tenant: TenantId,
    lock: Lock,
    guard: Option<OwnedMutexGuard<()>>,
}

impl TenantGates {
    /// Waits for `tenant`'s gate.
    pub(crate) async fn enter(&self, tenant: &TenantId) -> Gate<'_> {
        let lock = self.locks.lock().expect("gates lock").entry(tenant.clone()).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        Gate { gates: self, tenant: tenant.clone(), lock, guard: Some(guard) }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().expect("gates lock").len()
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.gates.locks.lock().expect("gates lock");
        // The map's reference and this one: nobody else waits (a newcomer clones under this same lock).
        if Arc::strong_count(&self.lock) == 2 {
            locks.remove(&self.tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_tenant_queues_others_pass_and_nothing_is_left_behind() {
        let gates = Arc::new(TenantGates::default());
        let (a, b) = (TenantId::parse("a").unwrap(), TenantId::parse("b").unwrap());
        let held = gates.enter(&a).await;
        let _other = tokio::time::timeout(Duration::from_secs(5), gates.enter(&b)).await.expect("b is not held up");
        let waiter = {
            let (gates, a) = (gates.clone(), a.clone());
            tokio::spawn(async move {
                let _g = gates.enter(&a).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a second entry of the same tenant waits");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("it enters once the first leaves").unwrap();
        drop(_other);
        assert_eq!(gates.len(), 0, "no entry outlives its last user");
    }
}
