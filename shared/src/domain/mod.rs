//! Domain types and pure rules. No I/O here.

mod snapshot;
mod tenant;
mod tenant_id;

pub use snapshot::{
    ChangeBatch, CredentialSnapshot, DEVICE_KEY, DeviceRecord, Incomplete, MAX_RECORD_KEY_LEN, MAX_RECORD_VALUE_LEN,
    MAX_WRITES_PER_COMMIT, RecordChange, RecordKey, RecordKind,
};
pub use tenant::{Lease, StatusUpdate, TenantRecord, TenantStatus, UnixMillis};
pub use tenant_id::{MAX_TENANT_ID_LEN, TenantId, TenantIdError};

/// The current time in [`UnixMillis`].
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as UnixMillis).unwrap_or(0)
}

mod session;
pub use session::{HostCondition, SessionLease, SessionList, SessionState, SessionView, StateChange};

pub mod reconcile;

mod backoff;
pub use backoff::BackoffPolicy;
