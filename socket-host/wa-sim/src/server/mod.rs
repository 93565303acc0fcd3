//! [`Sim`]: the handle a test or the `wa-sim` binary holds: start, configuration, errors, and [`SimHandle`]'s
//! operations by job in the files beside this one.
//!
//! # Layout
//! - `devices`: the registry: minting, QR pairing, registering devices paired elsewhere, revoking.
//! - `fault_switches`: faults acted on now (drops, half-open, stream errors) and set from now on.
//! - `watch`: observations, and waiting until the simulator has seen something.
//! - `contact_ops`: what the contacts the simulator plays send and receive.

mod contact_ops;
mod devices;
mod fault_switches;
mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;

use crate::faults::Command;
use crate::keys::ServerIdentity;
use crate::mint::MintError;
use crate::state::Shared;
use crate::{WS_PATH, conn, control};

/// What to do when a device logs in while it already has a logged-in connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConflictPolicy {
    /// End the older connection with `<conflict type="replaced"/>`, as WhatsApp does. The observation
    /// still records two concurrent connections.
    #[default]
    ReplaceOlder,
    /// Keep both (useful to measure how long a double connection would last).
    AllowConcurrent,
}

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where the WebSocket endpoint listens; port 0 picks a free one.
    pub bind: SocketAddr,
    /// Where the HTTP control surface listens, if anywhere.
    pub control_bind: Option<SocketAddr>,
    /// Derive the server keys from this seed, so a restarted simulator is the same server.
    pub key_seed: Option<[u8; 32]>,
    /// What a second concurrent login of one device does.
    pub conflict: ConflictPolicy,
    /// How long a client may take from TCP connect to the end of the Noise handshake.
    pub handshake_timeout: Duration,
    /// TCP listen backlog (a mass reconnect of 10,000 clients arrives at once).
    pub backlog: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            control_bind: None,
            key_seed: None,
            conflict: ConflictPolicy::default(),
            handshake_timeout: Duration::from_secs(20),
            backlog: 4096,
        }
    }
}

/// Why a simulator operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// No registered device has this JID.
    #[error("unknown device {0}")]
    UnknownDevice(String),
    /// The string is not a phone-number device JID.
    #[error("not a device jid: {0}")]
    InvalidJid(String),
    /// A fault parameter is out of range (e.g. a refusal code other than 429/503).
    #[error("invalid fault: {0}")]
    InvalidFault(String),
    /// A device record lacks what a login needs.
    #[error("device record is unusable: {0}")]
    InvalidRecord(&'static str),
    /// Minting failed.
    #[error(transparent)]
    Mint(#[from] MintError),
    /// A QR code is malformed or names no connection waiting to pair.
    #[error("pairing: {0}")]
    Pairing(&'static str),
    /// A wait ran out of time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// No contact has this phone number.
    #[error("unknown contact {0}")]
    UnknownContact(String),
    /// A phone number must be 5 to 20 digits.
    #[error("not a phone number (5 to 20 digits): {0}")]
    InvalidPhone(String),
    /// The device has published no pre-key bundle, so no session can be started with it.
    #[error("device {0} has no published keys")]
    NoKeys(String),
    /// Signal encryption failed (names no key material).
    #[error("signal: {0}")]
    Signal(String),
}

/// A running simulator. Dropping it stops accepting and ends every connection. Every operation lives on
/// [`SimHandle`], which `Sim` dereferences to.
pub struct Sim {
    handle: SimHandle,
    control_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sim {
    /// Starts a simulator on 127.0.0.1 with a free port and no control surface (the usual test set-up).
    pub async fn start_local() -> Result<Self, SimError> {
        Self::start(SimConfig::default()).await
    }

    /// Starts a simulator.
    pub async fn start(config: SimConfig) -> Result<Self, SimError> {
        let identity = match config.key_seed {
            Some(seed) => ServerIdentity::from_seed(&seed),
            None => ServerIdentity::generate(),
        };
        let listener = listen(config.bind, config.backlog)?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind { addr: config.bind, source })?;
        let control_bind = config.control_bind;
        let handle = SimHandle { shared: Arc::new(Shared::new(identity, config)), addr };
        let mut tasks = vec![tokio::spawn(accept_loop(handle.shared.clone(), listener))];
        let mut control_addr = None;
        if let Some(bind) = control_bind {
            let listener = TcpListener::bind(bind).await.map_err(|source| SimError::Bind { addr: bind, source })?;
            control_addr = Some(listener.local_addr().map_err(|source| SimError::Bind { addr: bind, source })?);
            let router = control::router(handle.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::warn!(error = %e, "control surface stopped");
                }
            }));
        }
        tracing::info!(%addr, control = ?control_addr, "wa-sim listening");
        Ok(Self { handle, control_addr, tasks })
    }

    /// The control surface's address, when one was asked for.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// A clone-able handle with every operation, for other tasks.
    pub fn handle(&self) -> SimHandle {
        self.handle.clone()
    }

    /// Stops the simulator: no new connections, every connection ended.
    pub async fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.handle.shared.closing.send_replace(true);
        self.handle.shared.command_all(Command::Drop);
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::ops::Deref for Sim {
    type Target = SimHandle;

    fn deref(&self) -> &SimHandle {
        &self.handle
    }
}

fn listen(bind: SocketAddr, backlog: u32) -> Result<TcpListener, SimError> {
    let err = |source| SimError::Bind { addr: bind, source };
    let socket = if bind.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(bind).map_err(err)?;
    socket.listen(backlog).map_err(err)
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(conn::serve(shared.clone(), tcp));
            }
            Err(e) => {
                // Out of file descriptors, typically: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Every simulator operation: registry, faults, observations. Cheap to clone.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl SimHandle {
    /// The WebSocket endpoint's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a client connects to: `ws://127.0.0.1:PORT/ws/chat`.
    pub fn url(&self) -> String {
        format!("ws://{}{}", self.addr, WS_PATH)
    }

    /// The public key of the root that signs the server's certificate chain (XEdDSA over curve25519),
    /// for clients that pin it in place of WhatsApp's.
    pub fn root_public_key(&self) -> [u8; 32] {
        self.shared.identity.root_public()
    }

    /// The server's Noise static public key (what a client caches for IK).
    pub fn server_static_key(&self) -> [u8; 32] {
        *self.shared.identity.static_public()
    }
}
