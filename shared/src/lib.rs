//! # wakeeper-shared
//!
//! What the socket host and the Lambda functions share.
//!
//! # Layout
//! - [`domain`]: tenant ids, tenant records, credential snapshots; pure types and rules, no I/O.
//! - [`crypto`]: AES-256-GCM sealing of every stored record and the data-key source.
//! - [`ports`]: the storage traits (`CredentialStore`, `TenantStore`) and their error kinds.
//! - [`adapters`]: the embedded default (redb), Firestore and DynamoDB, each behind a cargo feature.

pub mod adapters;
pub mod crypto;
pub mod domain;
pub mod ports;
