//! The readiness condition [`STORES_REACHABLE`]: both stores have answered since the host started. At start
//! the host asks each store for a tenant that does not exist (one DynamoDB `GetItem`, one Firestore document
//! read), with backoff, until both answer; `/ready` fails with the store's error until then.
//!
//! It is a start-up condition and does not turn false again: once serving, an outage of a store stops no open
//! session, and the control API keeps answering (reads from the host's memory, sends over open sessions), so a
//! platform must not take the host out of its load balancer for it. A later outage shows where it belongs:
//! failing calls, their errors on `/health` and the sweep's alerts.

use std::sync::Arc;
use std::time::Duration;

use wakeeper_shared::domain::TenantId;
use wakeeper_shared::ports::{CredentialStore, StoreError, TenantStore};

use crate::readiness::Condition;

/// Both stores have answered since start.
pub const STORES_REACHABLE: &str = "stores_reachable";

/// The tenant the probe asks for; it is never created.
const PROBE_TENANT: &str = "wakeeper-readiness-probe";

/// Probes both stores until each has answered once, then sets `condition` ok.
pub(crate) fn start(credentials: Arc<dyn CredentialStore>, tenants: Arc<dyn TenantStore>, condition: Condition) {
    let probe = TenantId::parse(PROBE_TENANT).expect("a valid tenant id");
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(250);
        loop {
            match probe_once(credentials.as_ref(), tenants.as_ref(), &probe).await {
                Ok(()) => {
                    condition.set_ok();
                    return;
                }
                Err(why) => {
                    tracing::warn!(error = %why, "a store does not answer yet");
                    condition.set_failing(why);
                }
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(15));
        }
    });
}

async fn probe_once(
    credentials: &dyn CredentialStore,
    tenants: &dyn TenantStore,
    probe: &TenantId,
) -> Result<(), String> {
    match tenants.get(probe).await {
        Ok(_) => {}
        Err(e) => return Err(format!("the tenant store: {e}")),
    }
    match credentials.generation(probe).await {
        Ok(_) | Err(StoreError::NotFound) => Ok(()),
        Err(e) => Err(format!("the credential store: {e}")),
    }
}
