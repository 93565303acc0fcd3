//! # wakeeper-shared
//!
//! What the socket host and the Lambda functions share.
//!
//! # Layout
//! - [`domain`]: tenant ids, tenant records, credential snapshots; pure types and rules, no I/O.
//! - [`crypto`]: AES-256-GCM sealing of every stored record and the data-key source.
//! - [`ports`]: the traits the rest needs from outside: `CredentialStore`, `TenantStore`, `HostOps`, `KeySource`.
//! - [`adapters`]: the embedded default (redb), Firestore and DynamoDB, each behind a cargo feature.
//! - [`contract`]: the contract-test suites every adapter passes (tests and the `contract-tests` feature only).
//! - [`host_api`]: the control API's wire types and the typed client the functions use.
//! - [`fleet`]: several hosts as one (tenants routed by shard), host URL lists, the client as a `HostOps`.
//! - [`local`] (feature `local`): the host's local copies: the journaled working copy of a tenant's snapshot,
//!   whole-tenant export files, and hydration from the credential store (the start-up rule), behind one
//!   `LocalCopies { data_dir, cipher }` handle.
//! - [`sweep`]: the health sweep: the reconcile plan carried out, statuses written only when they changed.
//! - [`restore`]: bringing desired tenants back on their hosts, in restore order, within a time budget.
//! - [`alerts`]: what the sweep alerts about and where alerts go (log, webhook, SNS).
//! - [`webhook`]: the one signature scheme and header names of every webhook (feature `webhook`).
//! - [`lambda`]: what both functions share: event classification, settings, cold-start set-up.
//! - [`emf`]: CloudWatch Embedded Metric Format lines.
//! - [`disk`]: local disk faults: full or failing writes classified, the host's record of faulted paths,
//!   free space and write probes, redb files reopened in place after a fault.
//! - [`private_files`]: secret files and private directories: no symlinks, no loose modes.
//! - [`tls`] (feature `tls`): the process's one rustls crypto provider, installed by every binary first thing.

pub mod adapters;
pub mod alerts;
#[cfg(any(feature = "dynamodb", feature = "kms", feature = "sns"))]
pub mod aws;
#[cfg(any(test, feature = "contract-tests"))]
pub mod contract;
pub mod crypto;
pub mod disk;
pub mod domain;
pub mod emf;
pub mod fleet;
pub mod host_api;
#[cfg(feature = "kms")]
pub mod kms;
pub mod lambda;
#[cfg(feature = "local")]
pub mod local;
pub mod ports;
pub mod private_files;
pub mod restore;
pub mod sweep;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "webhook")]
pub mod webhook;
