//! Storage adapters, one per backing service, each behind its cargo feature.
