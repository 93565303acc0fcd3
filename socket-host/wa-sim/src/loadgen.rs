//! A small raw client for load generation: WebSocket, connection header, Noise XX or IK as the initiator,
//! a login payload, and the server's verdict. It measures the simulator, not the engine, so it costs a
//! fraction of a real client and thousands of them fit beside the simulator on one machine.
//!
//! It verifies the server's certificate chain against a pinned root (the simulator's, from
//! [`crate::SimHandle::root_public_key`] or `GET /v1/keys`), as a client built for the simulator would.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use whatsapp_rust::buffa::{Message as _, MessageField};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::framing::{FrameDecoder, encode_frame};
use whatsapp_rust::wacore::handshake::{NoiseCipher, NoiseHandshake};
use whatsapp_rust::wacore::libsignal::protocol::{KeyPair, PublicKey};
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::consts::{NOISE_PATTERN_IK, NOISE_PATTERN_XX, WA_CONN_HEADER};
use whatsapp_rust::wacore_binary::marshal::{marshal, unmarshal_ref};
use whatsapp_rust::wacore_binary::util::unpack;
use whatsapp_rust::waproto::whatsapp as wa;

use crate::keys::public_bytes;

/// Why a load client failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Connecting or talking WebSocket failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The server closed the connection.
    #[error("server closed the connection")]
    Closed,
    /// A handshake message was malformed or did not decrypt.
    #[error("handshake: {0}")]
    Handshake(&'static str),
    /// The certificate chain does not verify against the pinned root.
    #[error("certificate chain does not verify against the pinned root")]
    Certificate,
    /// The server answered the login with something other than `<success>`.
    #[error("login refused with <{0}>")]
    Refused(String),
}

/// A device identity for load: a phone number, a device number and a noise key pair.
pub struct Credentials {
    /// Phone number (the JID user).
    pub user: u64,
    /// Companion device number.
    pub device: u16,
    noise: KeyPair,
}

impl Credentials {
    /// New credentials with a fresh noise key.
    pub fn generate(user: u64, device: u16) -> Self {
        Self { user, device, noise: KeyPair::generate(&mut rand::rng()) }
    }

    /// The phone-number device JID.
    pub fn jid(&self) -> String {
        whatsapp_rust::wacore_binary::Jid::pn_device(self.user.to_string(), self.device).to_string()
    }

    /// The noise static public key (what the simulator's registry must hold).
    pub fn noise_public(&self) -> [u8; 32] {
        public_bytes(&self.noise)
    }
}

/// What a load client knows about the server.
#[derive(Clone, Copy)]
pub struct ServerTrust {
    /// Pinned root key; `None` skips chain verification.
    pub root: Option<[u8; 32]>,
    /// The server's static key, when cached: the client then uses Noise IK.
    pub static_key: Option<[u8; 32]>,
}

/// A logged-in connection, held open until dropped.
pub struct Session {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    frames: FrameDecoder,
    read: NoiseCipher,
    write: NoiseCipher,
    read_counter: u32,
    write_counter: u32,
    /// The server's static key, for IK on the next login.
    pub server_static: [u8; 32],
    /// How long the login took (TCP connect to `<success>`).
    pub login_time: Duration,
}

/// Connects and logs in. Uses IK when `trust.static_key` is known, XX otherwise.
pub async fn login(url: &str, creds: &Credentials, trust: ServerTrust) -> Result<Session, LoadError> {
    let started = Instant::now();
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true).await?;
    let mut frames = FrameDecoder::new();
    let payload = login_payload(creds);
    let ephemeral = KeyPair::generate(&mut rand::rng());
    let eph_public = public_bytes(&ephemeral);
    let hs = |_| LoadError::Handshake("noise");

    let (noise, server_static) = match trust.static_key {
        Some(server_static) => {
            let mut noise = NoiseHandshake::new(NOISE_PATTERN_IK, &WA_CONN_HEADER).map_err(hs)?;
            noise.authenticate(&server_static);
            noise.authenticate(&eph_public);
            noise.mix_shared_secret(ephemeral.private_key.serialize(), &server_static).map_err(hs)?;
            let enc_static = noise.encrypt(&creds.noise_public()).map_err(hs)?;
            noise.mix_shared_secret(creds.noise.private_key.serialize(), &server_static).map_err(hs)?;
            let enc_payload = noise.encrypt(&payload).map_err(hs)?;
            let hello = wa::handshake_message::ClientHello {
                ephemeral: Some(eph_public.to_vec()),
                r#static: Some(enc_static),
                payload: Some(enc_payload),
                ..Default::default()
            };
            send_first(&mut ws, hello).await?;
            let reply = server_hello(&mut ws, &mut frames).await?;
            if reply.r#static.is_some() {
                return Err(LoadError::Handshake("server rejected ik"));
            }
            let e = server_ephemeral(&reply)?;
            noise.authenticate(&e);
            noise.mix_shared_secret(ephemeral.private_key.serialize(), &e).map_err(hs)?;
            noise.mix_shared_secret(creds.noise.private_key.serialize(), &e).map_err(hs)?;
            noise.decrypt(reply.payload.as_deref().ok_or(LoadError::Handshake("payload"))?).map_err(hs)?;
            (noise, server_static)
        }
        None => {
            let mut noise = NoiseHandshake::new(NOISE_PATTERN_XX, &WA_CONN_HEADER).map_err(hs)?;
            noise.authenticate(&eph_public);
            let hello =
                wa::handshake_message::ClientHello { ephemeral: Some(eph_public.to_vec()), ..Default::default() };
            send_first(&mut ws, hello).await?;
            let reply = server_hello(&mut ws, &mut frames).await?;
            let e = server_ephemeral(&reply)?;
            noise.authenticate(&e);
            noise.mix_shared_secret(ephemeral.private_key.serialize(), &e).map_err(hs)?;
            let s: [u8; 32] = noise
                .decrypt(reply.r#static.as_deref().ok_or(LoadError::Handshake("static"))?)
                .map_err(hs)?
                .try_into()
                .map_err(|_| LoadError::Handshake("static length"))?;
            noise.mix_shared_secret(ephemeral.private_key.serialize(), &s).map_err(hs)?;
            let cert = noise.decrypt(reply.payload.as_deref().ok_or(LoadError::Handshake("payload"))?).map_err(hs)?;
            if let Some(root) = trust.root {
                verify_chain(&cert, &root, &s)?;
            }
            let enc_static = noise.encrypt(&creds.noise_public()).map_err(hs)?;
            noise.mix_shared_secret(creds.noise.private_key.serialize(), &e).map_err(hs)?;
            let enc_payload = noise.encrypt(&payload).map_err(hs)?;
            let finish = wa::HandshakeMessage {
                client_finish: MessageField::some(wa::handshake_message::ClientFinish {
                    r#static: Some(enc_static),
                    payload: Some(enc_payload),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let framed = encode_frame(&finish.encode_to_vec(), None).map_err(|_| LoadError::Handshake("frame"))?;
            ws.send(Message::Binary(Bytes::from(framed))).await?;
            (noise, s)
        }
    };
    let (write, read) = noise.finish().map_err(hs)?;
    let mut session = Session {
        ws,
        frames,
        read,
        write,
        read_counter: 0,
        write_counter: 0,
        server_static,
        login_time: Duration::ZERO,
    };
    let verdict = session.next_tag().await?;
    if verdict != "success" {
        return Err(LoadError::Refused(verdict));
    }
    session.login_time = started.elapsed();
    Ok(session)
}

impl Session {
    /// Sends a keepalive ping and waits for the pong; returns the round trip.
    pub async fn ping(&mut self) -> Result<Duration, LoadError> {
        let started = Instant::now();
        let ping = NodeBuilder::new("iq")
            .attr("id", format!("ping-{}", self.write_counter))
            .attr("xmlns", "w:p")
            .attr("type", "get")
            .attr("to", "s.whatsapp.net")
            .build();
        let plain = marshal(&ping).map_err(|_| LoadError::Handshake("marshal"))?;
        let ct =
            self.write.encrypt_with_counter(self.write_counter, &plain).map_err(|_| LoadError::Handshake("encrypt"))?;
        self.write_counter += 1;
        let framed = encode_frame(&ct, None).map_err(|_| LoadError::Handshake("frame"))?;
        self.ws.send(Message::Binary(Bytes::from(framed))).await?;
        loop {
            if self.next_tag().await? == "iq" {
                return Ok(started.elapsed());
            }
        }
    }

    /// Waits until the server ends the connection; returns the tag of the last stanza it sent, if any
    /// (e.g. `stream:error`).
    pub async fn until_closed(mut self) -> Option<String> {
        let mut last = None;
        while let Ok(tag) = self.next_tag().await {
            last = Some(tag);
        }
        last
    }

    async fn next_tag(&mut self) -> Result<String, LoadError> {
        let mut frame = next_frame(&mut self.ws, &mut self.frames).await?;
        self.read
            .decrypt_in_place_with_counter(self.read_counter, &mut frame)
            .map_err(|_| LoadError::Handshake("decrypt"))?;
        self.read_counter += 1;
        let data = unpack(&frame).map_err(|_| LoadError::Handshake("unpack"))?;
        let node = unmarshal_ref(&data).map_err(|_| LoadError::Handshake("decode"))?;
        Ok(node.tag.to_string())
    }
}

fn login_payload(creds: &Credentials) -> Vec<u8> {
    wa::ClientPayload {
        username: Some(creds.user),
        device: Some(u32::from(creds.device)),
        passive: Some(false),
        pull: Some(true),
        connect_type: Some(wa::client_payload::ConnectType::WIFI_UNKNOWN),
        connect_reason: Some(wa::client_payload::ConnectReason::USER_ACTIVATED),
        ..Default::default()
    }
    .encode_to_vec()
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn send_first(ws: &mut Ws, hello: wa::handshake_message::ClientHello) -> Result<(), LoadError> {
    let msg = wa::HandshakeMessage { client_hello: MessageField::some(hello), ..Default::default() };
    let framed =
        encode_frame(&msg.encode_to_vec(), Some(&WA_CONN_HEADER)).map_err(|_| LoadError::Handshake("frame"))?;
    ws.send(Message::Binary(Bytes::from(framed))).await?;
    Ok(())
}

async fn next_frame(ws: &mut Ws, frames: &mut FrameDecoder) -> Result<whatsapp_rust::bytes::BytesMut, LoadError> {
    loop {
        if let Some(f) = frames.decode_frame() {
            return Ok(f);
        }
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => frames.feed(&b),
            Some(Ok(Message::Close(_))) | None => return Err(LoadError::Closed),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

async fn server_hello(ws: &mut Ws, frames: &mut FrameDecoder) -> Result<wa::handshake_message::ServerHello, LoadError> {
    let frame = next_frame(ws, frames).await?;
    wa::HandshakeMessage::decode_from_slice(&frame)
        .map_err(|_| LoadError::Handshake("server hello"))?
        .server_hello
        .into_option()
        .ok_or(LoadError::Handshake("server hello"))
}

fn server_ephemeral(hello: &wa::handshake_message::ServerHello) -> Result<[u8; 32], LoadError> {
    hello.ephemeral.as_deref().and_then(|e| e.try_into().ok()).ok_or(LoadError::Handshake("server ephemeral"))
}

/// Verifies `root -> intermediate -> leaf` and that the leaf names the static key the server proved.
pub fn verify_chain(cert_chain: &[u8], root: &[u8; 32], server_static: &[u8; 32]) -> Result<(), LoadError> {
    use wa::cert_chain::noise_certificate::Details;
    let chain = wa::CertChain::decode_from_slice(cert_chain).map_err(|_| LoadError::Certificate)?;
    let step = |issuer: &[u8], cert: Option<&wa::cert_chain::NoiseCertificate>| -> Result<Details, LoadError> {
        let cert = cert.ok_or(LoadError::Certificate)?;
        let details = cert.details.as_deref().ok_or(LoadError::Certificate)?;
        let signature = cert.signature.as_deref().ok_or(LoadError::Certificate)?;
        let key = PublicKey::from_djb_public_key_bytes(issuer).map_err(|_| LoadError::Certificate)?;
        if !key.verify_signature(details, signature) {
            return Err(LoadError::Certificate);
        }
        Details::decode_from_slice(details).map_err(|_| LoadError::Certificate)
    };
    let intermediate = step(root, chain.intermediate.as_option())?;
    let leaf = step(intermediate.key.as_deref().ok_or(LoadError::Certificate)?, chain.leaf.as_option())?;
    if leaf.key.as_deref() != Some(&server_static[..]) || leaf.issuer_serial != intermediate.serial {
        return Err(LoadError::Certificate);
    }
    Ok(())
}

/// A minimal HTTP/1.1 JSON client for the control surface (one request per connection), so load tools
/// need no HTTP stack of their own. Returns the status and the parsed body (`null` when empty).
pub async fn control_request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), std::io::Error> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let host = base.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = TcpStream::connect(host).await?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8(response).map_err(|_| invalid("response is not utf-8"))?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| invalid("no header end"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| invalid("no status"))?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    let value = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body))
    };
    Ok((status, value))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
