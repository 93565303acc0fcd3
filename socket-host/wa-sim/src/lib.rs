//! wa-sim: a local fake of the WhatsApp Web chat server, faithful where a client can tell.
//!
//! No test or benchmark of wakeeper may reach WhatsApp, yet every claim about sessions surviving restarts,
//! reconnecting after faults and stopping on conflicts has to be shown against real sockets and the real
//! engine. This crate is the other end of those sockets: the WebSocket endpoint, the framing, the Noise
//! XX/IK handshake with a certificate chain of its own, logins checked against a registry of devices, the
//! IQs a freshly connected client sends, and faults that can be switched on while clients are connected.
//!
//! Start one in-process with [`Sim::start`] (tests) or run the `wa-sim` binary (benchmarks, manual runs).
//!
//! # Layout
//! - [`server`]: [`Sim`], the handle tests hold: start, mint devices, switch faults, read observations.
//! - [`faults`]: what can go wrong, and for whom ([`Target`]).
//! - [`observe`]: what a real server would notice, as plain serialisable snapshots.
//! - [`mint`]: paired devices made without a phone, in the `shared` snapshot format.
//! - `contacts`: WhatsApp users the simulator plays, with real Signal sessions ([`ContactInfo`] and the
//!   records they keep); `relay`: message, receipt and ack routing between devices and contacts, and
//!   the offline queue.
//! - [`control`]: the HTTP control surface (axum) over the same operations.
//! - [`loadgen`]: a small raw Noise client for load generation (no engine).
//! - `keys`, `noise`, `wire`, `conn`, `iq`, `state`: the server internals (keys and certificate chain,
//!   handshake responder, framing and transport encryption, one task per connection, IQ answers, registry);
//!   `pair_code`: the answer to a fresh client's pairing-code request.

pub mod control;
pub mod faults;
pub mod loadgen;
pub mod mint;
pub mod observe;
pub mod server;

mod conn;
mod contacts;
mod iq;
mod keys;
mod noise;
mod pair_code;
mod relay;
mod state;
mod wire;

pub use contacts::{ContactInfo, ContactMessage, ContactSent, ReceiptKind, ReceiptSeen};
pub use faults::{PongMode, Refusal, RefusePoint, StreamErrorKind, Target};
pub use mint::{MintOptions, MintedDevice, device_from_record, device_to_record};
pub use observe::{DeviceObservation, Observations, Summary};
pub use server::{ConflictPolicy, Sim, SimConfig, SimError, SimHandle};

/// The path the WebSocket endpoint answers on, as WhatsApp's does.
pub const WS_PATH: &str = "/ws/chat";
