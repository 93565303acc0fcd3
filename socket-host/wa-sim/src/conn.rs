//! One task per connection: WebSocket upgrade, connection header, Noise handshake, login decision, then
//! the stanza loop with its fault modes.
//!
//! The task owns everything about its connection (socket, ciphers, delayed pongs) and holds no lock across
//! an await, so 10,000 of them cost little more than their sockets.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use whatsapp_rust::buffa::Message as _;
use whatsapp_rust::bytes::BytesMut;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::{Jid, Node};
use whatsapp_rust::waproto::whatsapp as wa;

use crate::WS_PATH;
use crate::faults::{Command, PongMode, RefusePoint, StreamErrorKind};
use crate::iq::{self, Outcome};
use crate::keys::now_secs;
use crate::noise::{ClientHello, Established, HandshakeFailure, IkOutcome, respond_ik, start_xx};
use crate::relay;
use crate::state::{Admission, KeyBundle, PendingPairing, Shared, SignedPreKey};
use crate::wire::{Channel, Link, WireError};

/// Why a connection ended early. Logged at debug; never carries key material.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Handshake(#[from] HandshakeFailure),
    #[error("handshake timed out")]
    Timeout,
    #[error("client payload does not decode")]
    Payload,
}

/// Serves one accepted TCP connection to the end.
pub(crate) async fn serve(shared: Arc<Shared>, tcp: TcpStream) {
    let second = (shared.uptime_ms() / 1000) as usize;
    shared.update(|s| {
        s.rec.connect_attempt(second);
        s.rec.socket_opened();
    });
    let mut closing = shared.closing.subscribe();
    let outcome = tokio::select! {
        outcome = run(&shared, tcp) => outcome,
        _ = closing.wait_for(|c| *c) => Err(ConnError::Wire(WireError::Closed)),
    };
    shared.update(|s| {
        s.rec.socket_closed();
        if outcome.as_ref().is_err_and(|e| !matches!(e, ConnError::Wire(WireError::Closed))) {
            s.rec.handshake_failed();
        }
    });
    if let Err(e) = outcome {
        tracing::debug!(error = %e, "connection ended before login");
    }
}

/// The part of a connection before login. Returns `Ok` once the connection was handed to the stanza loop
/// (or refused/rejected after a completed handshake).
async fn run(shared: &Arc<Shared>, tcp: TcpStream) -> Result<(), ConnError> {
    let _ = tcp.set_nodelay(true);
    let upgrade_refusal = {
        let s = shared.lock();
        s.global.active_refusal(Instant::now()).filter(|r| r.point == RefusePoint::Upgrade)
    };
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0).max_message_size(Some(1 << 24));
    // The callback's error type is tungstenite's; its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != WS_PATH {
            return Err(status(StatusCode::NOT_FOUND));
        }
        if let Some(r) = upgrade_refusal {
            return Err(status(StatusCode::from_u16(r.code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)));
        }
        Ok(resp)
    };
    let ws = match timeout(
        shared.config.handshake_timeout,
        tokio_tungstenite::accept_hdr_async_with_config(tcp, check, Some(config)),
    )
    .await
    {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            if upgrade_refusal.is_some() {
                shared.update(|s| s.rec.refused_at_upgrade());
            }
            return Err(WireError::from(e).into());
        }
        Err(_) => return Err(ConnError::Timeout),
    };
    let mut link = Link::new(ws);
    let est = timeout(shared.config.handshake_timeout, handshake(shared, &mut link))
        .await
        .map_err(|_| ConnError::Timeout)??;

    let payload = wa::ClientPayload::decode_from_slice(&est.payload).map_err(|_| ConnError::Payload)?;
    let mut channel = Channel::new(est.read, est.write);
    let Some(jid) = claimed_jid(&payload) else {
        // No phone number: a fresh client asking to pair (registration payload), or nonsense.
        match payload.device_pairing_data.as_option().and_then(registration_keys) {
            Some(keys) => {
                let end = pairing(shared, link, channel, est.client_static, keys).await;
                tracing::debug!(end = %end, "pairing connection closed");
            }
            None => {
                send(&mut link, &mut channel, &failure()).await?;
                link.close().await;
            }
        }
        return Ok(());
    };
    let jid_str = jid.to_string();
    match shared.admit(&jid_str, &est.client_static, est.pattern) {
        Admission::Reject => {
            tracing::debug!(device = %jid_str, "login rejected with 401");
            send(&mut link, &mut channel, &failure()).await?;
            link.close().await;
        }
        Admission::Refuse(r) => {
            tracing::debug!(device = %jid_str, code = r.code, "connect refused");
            send(&mut link, &mut channel, &stream_error_code(r.code)).await?;
            link.close().await;
        }
        Admission::Login => {
            let success = success(shared, &jid_str);
            // Counted as logged in before the client can see `success`: a client that reports itself connected
            // is already in every count and observation.
            let conn = shared.conn_id();
            let (tx, rx) = mpsc::unbounded_channel();
            let (outbox_tx, mut outbox) = mpsc::unbounded_channel();
            shared.logged_in(conn, &jid_str, tx, outbox_tx);
            let end = match send(&mut link, &mut channel, &success).await {
                Ok(()) => stanza_loop(shared, &jid_str, link, channel, rx, &mut outbox).await,
                Err(e) => End::Error(e),
            };
            shared.logged_out(conn);
            relay::requeue(shared, &jid_str, &mut outbox);
            tracing::debug!(device = %jid_str, end = %end, "connection closed");
        }
    }
    Ok(())
}

fn status(code: StatusCode) -> ErrorResponse {
    let mut resp = ErrorResponse::new(None);
    *resp.status_mut() = code;
    resp
}

/// Reads the client's hello, answers with the matching pattern and returns the completed handshake.
async fn handshake(shared: &Shared, link: &mut Link) -> Result<Established, ConnError> {
    let hello = ClientHello::parse(&link.next_frame().await?)?;
    if hello.is_ik() {
        match respond_ik(&shared.identity, &hello)? {
            IkOutcome::Accepted(est, reply) => {
                // IK carries the login payload in the first message, so the device is known before we answer.
                let device = wa::ClientPayload::decode_from_slice(&est.payload).ok().as_ref().and_then(claimed_jid);
                delay_handshake(shared, device.map(|j| j.to_string()).as_deref()).await;
                link.send_frame(&reply).await?;
                return Ok(*est);
            }
            IkOutcome::Rejected => {
                let (pending, reply) = start_xx(&shared.identity, &hello, true)?;
                delay_handshake(shared, None).await;
                link.send_frame(&reply).await?;
                return Ok(pending.finish(&link.next_frame().await?)?);
            }
        }
    }
    let (pending, reply) = start_xx(&shared.identity, &hello, false)?;
    delay_handshake(shared, None).await;
    link.send_frame(&reply).await?;
    Ok(pending.finish(&link.next_frame().await?)?)
}

async fn delay_handshake(shared: &Shared, device: Option<&str>) {
    let delay = shared.lock().effective(device).handshake_delay;
    if let Some(d) = delay {
        sleep(d).await;
    }
}

/// The device a login payload names: `username` is the phone number, `device` the companion number.
fn claimed_jid(payload: &wa::ClientPayload) -> Option<Jid> {
    let user = payload.username?;
    Some(Jid::pn_device(user.to_string(), payload.device.unwrap_or(0) as u16))
}

fn success(shared: &Shared, jid: &str) -> Node {
    let s = shared.lock();
    let mut node = NodeBuilder::new("success")
        .attr("t", now_secs().to_string())
        .attr("props", "1")
        .attr("abprops", "1")
        .attr("location", "sim")
        .attr(
            "creation",
            s.devices.get(jid).and_then(|d| d.account.as_ref()).map_or(0, |a| a.created_secs).to_string(),
        );
    if let Some(lid) = s.devices.get(jid).and_then(|d| d.lid.as_ref()) {
        node = node.attr("lid", Jid::lid(lid.user.as_str()));
    }
    node.build()
}

fn failure() -> Node {
    NodeBuilder::new("failure").attr("reason", "401").attr("location", "sim").build()
}

fn stream_error_code(code: u16) -> Node {
    NodeBuilder::new("stream:error").attr("code", code.to_string()).build()
}

fn stream_error(kind: StreamErrorKind) -> Node {
    let conflict = |t: &'static str| {
        NodeBuilder::new("stream:error").children([NodeBuilder::new("conflict").attr("type", t).build()]).build()
    };
    match kind {
        StreamErrorKind::Replaced => conflict("replaced"),
        StreamErrorKind::DeviceRemoved => conflict("device_removed"),
        k => stream_error_code(k.code()),
    }
}

async fn send(link: &mut Link, channel: &mut Channel, node: &Node) -> Result<(), WireError> {
    let framed = channel.seal(node)?;
    link.send_raw(framed).await
}

/// The key bundle a registration payload announces.
fn registration_keys(reg: &wa::client_payload::DevicePairingRegistrationData) -> Option<KeyBundle> {
    let id3 = |b: &[u8]| (b.len() == 3).then(|| u32::from_be_bytes([0, b[0], b[1], b[2]]));
    Some(KeyBundle {
        registration_id: Some(u32::from_be_bytes(reg.e_regid.as_deref()?.try_into().ok()?)),
        identity: Some(reg.e_ident.as_deref()?.try_into().ok()?),
        signed_pre_key: Some(SignedPreKey {
            id: id3(reg.e_skey_id.as_deref()?)?,
            public: reg.e_skey_val.as_deref()?.try_into().ok()?,
            signature: reg.e_skey_sig.clone().filter(|s| s.len() == 64)?,
        }),
        prekeys: Default::default(),
        server_has_prekeys: false,
    })
}

/// The pairing flow of a fresh client: hand out QR refs, wait for [`crate::SimHandle::pair`] to "scan" one,
/// send `pair-success`, take the client's signed `pair-device-sign`, then ask for a restart (515) so the
/// client logs in with its new identity.
async fn pairing(
    shared: &Shared,
    mut link: Link,
    mut channel: Channel,
    noise_public: [u8; 32],
    keys: KeyBundle,
) -> End {
    let conn = shared.conn_id();
    let refs: Vec<String> = (0..6).map(|_| pairing_ref()).collect();
    let (tx, mut offers) = mpsc::unbounded_channel();
    shared.update(|s| {
        s.rec.pairing_started();
        s.pairings.insert(conn, PendingPairing { refs: refs.clone(), noise_public, keys, offer: tx });
    });
    let pair_device = NodeBuilder::new("iq")
        .attr("from", iq::SERVER)
        .attr("id", format!("pair-{conn}"))
        .attr("type", "set")
        .attr("xmlns", "md")
        .children([NodeBuilder::new("pair-device")
            .children(refs.iter().map(|r| NodeBuilder::new("ref").bytes(r.as_bytes().to_vec()).build()))
            .build()])
        .build();
    let end = pairing_loop(shared, &mut link, &mut channel, &mut offers, pair_device).await;
    shared.update(|s| s.pairings.remove(&conn));
    if matches!(end, End::StreamError(_)) {
        link.close().await;
    }
    end
}

async fn pairing_loop(
    shared: &Shared,
    link: &mut Link,
    channel: &mut Channel,
    offers: &mut mpsc::UnboundedReceiver<(String, Node)>,
    pair_device: Node,
) -> End {
    if let Err(e) = send(link, channel, &pair_device).await {
        return End::Error(e);
    }
    let mut paired: Option<String> = None;
    loop {
        tokio::select! {
            offer = offers.recv() => {
                let Some((jid, node)) = offer else { return End::Dropped };
                if let Err(e) = send(link, channel, &node).await {
                    return End::Error(e);
                }
                paired = Some(jid);
            }
            frame = link.next_frame() => {
                let mut frame = match frame {
                    Ok(f) => f,
                    Err(WireError::Closed) => return End::ClientClosed,
                    Err(e) => return End::Error(e),
                };
                if let Err(e) = channel.open(&mut frame) {
                    return End::Error(e);
                }
                let step = crate::wire::with_node(&frame, |node| {
                    if node.tag != "iq" {
                        return PairStep::Ignore;
                    }
                    if node.get_attr("xmlns").is_some_and(|x| x.as_str() == "w:p") {
                        let id = node.get_attr("id").map(|v| v.as_str().into_owned()).unwrap_or_default();
                        return PairStep::Ping(id);
                    }
                    if let Some(answer) = crate::pair_code::companion_hello_answer(node) {
                        return PairStep::Answer(answer);
                    }
                    match node.get_optional_child("pair-device-sign").and_then(|c| c.get_optional_child("device-identity")) {
                        Some(identity) => PairStep::Signed(identity.content_bytes().map(<[u8]>::to_vec)),
                        None if node.get_attr("type").is_some_and(|t| t.as_str() == "error") => PairStep::Refused,
                        None => PairStep::Ignore,
                    }
                });
                match step {
                    Err(e) => return End::Error(e),
                    Ok(PairStep::Ignore) => {}
                    Ok(PairStep::Answer(answer)) => {
                        if let Err(e) = send(link, channel, &answer).await {
                            return End::Error(e);
                        }
                    }
                    Ok(PairStep::Ping(id)) => {
                        if let Err(e) = send(link, channel, &iq::pong(&id)).await {
                            return End::Error(e);
                        }
                    }
                    Ok(PairStep::Refused) => {
                        tracing::debug!("client refused pair-success");
                        return End::ClientClosed;
                    }
                    Ok(PairStep::Signed(identity)) => {
                        let Some(jid) = paired.clone() else { continue };
                        shared.update(|s| {
                            s.rec.pairing_completed();
                            if let (Some(bytes), Some(account)) =
                                (identity, s.devices.get_mut(&jid).and_then(|d| d.account.as_mut()))
                            {
                                account.device_identity = bytes;
                            }
                        });
                        tracing::debug!(device = %jid, "pairing completed; asking the client to restart");
                        let _ = send(link, channel, &stream_error(StreamErrorKind::RestartRequired)).await;
                        return End::StreamError(StreamErrorKind::RestartRequired);
                    }
                }
            }
        }
    }
}

enum PairStep {
    Ignore,
    /// A pairing-code request, answered (see [`crate::pair_code`]).
    Answer(Node),
    Ping(String),
    Signed(Option<Vec<u8>>),
    Refused,
}

/// A QR ref: opaque to the client, unique per handout.
fn pairing_ref() -> String {
    use base64::Engine as _;
    use rand::Rng as _;
    let mut bytes = [0u8; 18];
    rand::rng().fill_bytes(&mut bytes);
    format!("2@{}", base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// How a logged-in connection ended.
#[derive(Debug)]
enum End {
    ClientClosed,
    Dropped,
    StreamError(StreamErrorKind),
    Error(WireError),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed"),
            End::Dropped => f.write_str("dropped by fault"),
            End::StreamError(k) => write!(f, "stream error {}", k.code()),
            End::Error(e) => write!(f, "{e}"),
        }
    }
}

/// Serves a logged-in connection until it ends.
async fn stanza_loop(
    shared: &Shared,
    jid: &str,
    link: Link,
    channel: Channel,
    mut commands: mpsc::UnboundedReceiver<Command>,
    outbox: &mut mpsc::UnboundedReceiver<Node>,
) -> End {
    let mut conn = LoggedIn { shared, jid, link, channel, half_open: false, delayed_pongs: VecDeque::new() };
    loop {
        let next_pong = conn.delayed_pongs.front().map(|(at, _)| *at);
        let step = tokio::select! {
            biased;
            command = commands.recv() => conn.on_command(command).await,
            _ = sleep_until(next_pong.unwrap_or_else(Instant::now)), if next_pong.is_some() => {
                conn.send_delayed_pong().await
            }
            node = outbox.recv(), if !conn.half_open => {
                // Messages and receipts the relay routed to this device.
                match node {
                    Some(node) => conn.send(&node).await,
                    None => Err(End::Dropped),
                }
            }
            frame = conn.link.next_frame() => conn.on_frame(frame).await,
        };
        if let Err(end) = step {
            return conn.finish(end).await;
        }
    }
}

/// A logged-in connection as the stanza loop serves it: its socket and transport cipher, whether a fault made
/// it half-open, and the pongs a fault delays. Each step returns `Err` with how the connection ended.
struct LoggedIn<'a> {
    shared: &'a Shared,
    jid: &'a str,
    link: Link,
    channel: Channel,
    half_open: bool,
    delayed_pongs: VecDeque<(Instant, String)>,
}

impl LoggedIn<'_> {
    async fn send(&mut self, node: &Node) -> Result<(), End> {
        send(&mut self.link, &mut self.channel, node).await.map_err(End::Error)
    }

    /// A fault command for this connection (or the simulator going away: `None`); a stream error ends it (see
    /// [`LoggedIn::finish`]).
    async fn on_command(&mut self, command: Option<Command>) -> Result<(), End> {
        let jid = self.jid;
        let kind = match command {
            None | Some(Command::Drop) => return Err(End::Dropped),
            Some(Command::HalfOpen) => {
                self.half_open = true;
                self.delayed_pongs.clear();
                return Ok(());
            }
            Some(Command::StreamError(kind)) => {
                self.shared.update(|s| s.rec.stream_error(jid, false));
                kind
            }
            Some(Command::Superseded) => {
                self.shared.update(|s| s.rec.stream_error(jid, true));
                StreamErrorKind::Replaced
            }
        };
        Err(End::StreamError(kind))
    }

    /// How the connection ended; a stream error is sent to the client first (unless the connection is
    /// half-open), then the socket closed.
    async fn finish(mut self, end: End) -> End {
        if let End::StreamError(kind) = &end
            && !self.half_open
        {
            let _ = send(&mut self.link, &mut self.channel, &stream_error(*kind)).await;
            self.link.close().await;
        }
        end
    }

    async fn send_delayed_pong(&mut self) -> Result<(), End> {
        match self.delayed_pongs.pop_front() {
            Some((_, id)) => self.send(&iq::pong(&id)).await,
            None => Ok(()),
        }
    }

    /// A frame from the client: decrypted, answered (IQs, pings), and routed (messages, receipts, acks).
    async fn on_frame(&mut self, frame: Result<BytesMut, WireError>) -> Result<(), End> {
        let mut frame = match frame {
            Ok(f) => f,
            Err(WireError::Closed) => return Err(End::ClientClosed),
            Err(e) => return Err(End::Error(e)),
        };
        if self.half_open {
            // Read and discard: to the client this is indistinguishable from a peer that stopped
            // reading (its kernel acknowledges either way), and we still notice when it hangs up.
            return Ok(());
        }
        self.channel.open(&mut frame).map_err(End::Error)?;
        let (shared, jid) = (self.shared, self.jid);
        let (outcome, routed) = crate::wire::with_node(&frame, |node| {
            let routed = matches!(&*node.tag, "message" | "receipt" | "ack").then(|| relay::inbound(node)).flatten();
            (iq::handle(shared, jid, node), routed)
        })
        .map_err(End::Error)?;
        let replies = match outcome {
            Outcome::Nothing => Vec::new(),
            Outcome::Reply(nodes) => nodes,
            Outcome::Ping(id) => match self.pong(id) {
                Some(pong) => vec![pong],
                None => return Ok(()),
            },
        };
        for node in &replies {
            self.send(node).await?;
        }
        // After the server's ack, as WhatsApp acks a message before the recipient sees it.
        if let Some(routed) = routed {
            relay::handle(shared, jid, routed).await;
        }
        Ok(())
    }

    /// The answer to a keepalive ping as the pong setting says: now, never, or later (queued; `None` then).
    fn pong(&mut self, id: String) -> Option<Node> {
        let jid = self.jid;
        self.shared.update(|s| s.rec.ping(jid));
        let mode = self.shared.lock().effective(Some(jid)).pong.unwrap_or_default();
        match mode {
            PongMode::Normal => Some(iq::pong(&id)),
            PongMode::Drop => None,
            PongMode::Delay { delay } => {
                self.delayed_pongs.push_back((Instant::now() + delay, id));
                None
            }
        }
    }
}
