//! # wakeeper-testkit
//!
//! What the workspace's tests share, written once: the real `socket-host` binary as a child process, the fake
//! WhatsApp server's devices seeded into stores, the cloud servers of the integration run, and a real engine
//! client for the fake server's own tests. A dev-dependency only.
//!
//! # Layout
//! - [`wait`]: polling with a deadline (no sleeps as synchronisation) and tenant ids.
//! - [`dirs`]: a test's data directory and key file.
//! - [`seed`]: restorable devices minted on the fake server, stored as desired tenants.
//! - [`host`]: the host binary as a child process (ports, environment, logs, SIGTERM/SIGKILL), also under
//!   another uid as the container runs it.
//! - [`cloud`]: the Firestore emulator and DynamoDB Local of the integration run, fresh names per test.
//! - [`engine_client`]: the whatsapp-rust engine against the fake server over a WebSocket transport of its own.
//! - [`engine_log`]: the engine's `log` records captured, for tests that assert a clean run.
//!
//! The host binary's path comes from the calling test crate ([`socket_host_bin!`]): cargo names it only to
//! the integration tests of the `socket-host` package, and builds it for them first.

pub mod baileys;
pub mod cloud;
pub mod dirs;
pub mod engine_client;
pub mod engine_log;
pub mod host;
pub mod seed;
pub mod wait;

pub use cloud::{CloudStores, aws_endpoint, dynamodb_endpoint, firestore_emulator, fresh_prefix, local_aws_env};
pub use dirs::Dirs;
pub use engine_client::{TestClient, event_name};
pub use engine_log::{init_logging, warnings};
pub use host::{DEFAULT_HOST_LOG, Launch, TOKEN, TestHost, spawn_unprivileged};
pub use seed::seed_embedded;
pub use wait::{tenant, wait_until};

/// The `socket-host` binary cargo built for the calling integration test (a macro: `env!` must expand in the
/// test crate, where cargo sets `CARGO_BIN_EXE_socket-host`).
#[macro_export]
macro_rules! socket_host_bin {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_socket-host"))
    };
}
