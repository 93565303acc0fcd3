//! # wakeeper-shared
//!
//! What the socket host and the Lambda functions share.
//!
//! # Layout
//! - [`domain`]: tenant ids, tenant records, credential snapshots; pure types and rules, no I/O.
//! - [`crypto`]: AES-256-GCM sealing of every stored record and the data-key source.
//! - [`ports`]: the storage traits (`CredentialStore`, `TenantStore`) and their error kinds.
//! - [`adapters`]: the embedded default (redb), Firestore and DynamoDB, each behind a cargo feature.
//! - [`contract`]: the contract-test suites every adapter passes (tests and the `contract-tests` feature only).
//! - [`host_api`]: the control API's wire types and the typed client the functions use.
//! - [`working_copy`]: the host's local, journaled copy of a tenant's snapshot; whole-tenant export files.
//! - [`hydrate`]: filling the working copy from the credential store, and the start-up rule.
//! - [`sweep`]: the health sweep (reconcile carried out), the `HostOps` port, host fleets and alert sinks.
//! - [`restore_fanout`]: the restore fan-out the restore function and CLI run.
//! - [`emf`]: CloudWatch Embedded Metric Format lines.

pub mod adapters;
#[cfg(any(test, feature = "contract-tests"))]
pub mod contract;
pub mod crypto;
pub mod domain;
pub mod emf;
pub mod host_api;
pub mod hydrate;
pub mod ports;
pub mod restore_fanout;
pub mod sweep;
pub mod working_copy;
