//! Ports: what the rest of wakeeper needs from the world outside it, as traits over domain types that return
//! our own errors, never SDK types. Adapters live in [`crate::adapters`] (storage), [`crate::fleet`] (the
//! control-API client as a host) and [`crate::crypto`] (data keys); every storage adapter passes the same
//! contract suite ([`crate::contract`]).
//!
//! # Layout
//! - [`store`]: [`CredentialStore`], [`TenantStore`] and [`StoreError`].
//! - [`host`]: [`HostOps`], what the sweep and the restore need from a host, and [`HostError`].
//! - [`keys`]: [`KeySource`], where the data key that seals stored credentials comes from.

pub mod host;
pub mod keys;
pub mod store;

pub use host::{EnsureAnswer, HostError, HostOps};
pub use keys::KeySource;
pub use store::{Conflict, CredentialStore, Page, StoreError, StoredAt, TenantStore};
