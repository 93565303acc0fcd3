//! The process's one TLS stack: rustls on the aws-lc-rs crypto provider, the provider the AWS SDK and Google's
//! auth crate are built on (ring is not compiled in).
//!
//! Clients that ask rustls for the process default (tonic under the Firestore client, reqwest, the host's
//! WebSockets) panic on their first TLS connection when none is installed and rustls cannot pick one itself.
//! Every binary therefore calls [`install_crypto_provider`] first thing, and every adapter here that opens TLS
//! connections calls it again before it builds a client, so library users and tests run on the same stack.
//! The AWS SDK builds its own configuration on the same provider.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// Installs aws-lc-rs as the process's default rustls crypto provider, unless one is installed already.
/// Idempotent and cheap after the first call.
pub fn install_crypto_provider() {
    if CryptoProvider::get_default().is_none() {
        // Another thread may have installed it in between; the default is set either way.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// The process's crypto provider (installed first if need be), for code that builds its own
/// `rustls::ClientConfig`.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    install_crypto_provider();
    CryptoProvider::get_default().expect("a crypto provider was installed above").clone()
}

/// A reqwest client builder on the process's TLS stack: reqwest is built without a provider of its own and
/// panics when it finds no process default, so every reqwest client of the workspace starts here.
#[cfg(feature = "client")]
pub fn http_client() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installing_twice_keeps_one_provider() {
        install_crypto_provider();
        let first = crypto_provider();
        install_crypto_provider();
        assert!(Arc::ptr_eq(&first, &crypto_provider()));
    }
}
