//! Storage adapters, one per backing service, each behind its cargo feature.

#[cfg(feature = "embedded")]
pub mod embedded;

#[cfg(feature = "firestore")]
pub mod firestore;

#[cfg(feature = "dynamodb")]
pub mod dynamodb;
