//! Bytes on the socket: WebSocket binary messages carrying WhatsApp frames (a 3-byte length, then the
//! payload), the connection header the client opens with, and, after the handshake, frames that are
//! AES-GCM encrypted binary XML nodes.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use whatsapp_rust::bytes::{Bytes, BytesMut};
use whatsapp_rust::wacore::framing::{FrameDecoder, encode_frame};
use whatsapp_rust::wacore::handshake::NoiseCipher;
use whatsapp_rust::wacore_binary::consts::WA_CONN_HEADER;
use whatsapp_rust::wacore_binary::marshal::{marshal_to_vec, unmarshal_ref};
use whatsapp_rust::wacore_binary::util::unpack;
use whatsapp_rust::wacore_binary::{Node, NodeRef};

/// Why a connection's byte stream ended or became unusable. Names no payload.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("peer closed the connection")]
    Closed,
    #[error("websocket error: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("connection header is not WhatsApp's")]
    BadHeader,
    #[error("frame does not decrypt")]
    Decrypt,
    #[error("frame is not a binary node")]
    Decode,
    #[error("frame too large")]
    TooLarge,
    #[error("counter exhausted")]
    Counter,
}

/// Longest edge-routing pre-intro we accept before the `WA` header (the client's own limit is 16 MiB;
/// real routing info is a few dozen bytes).
const MAX_PREINTRO: usize = 4096;

/// The WebSocket plus frame reassembly. One per connection; kept small because 10,000 of them live at once.
pub(crate) struct Link {
    ws: WebSocketStream<TcpStream>,
    frames: FrameDecoder,
    /// Bytes received before the connection header was complete.
    header: Option<Vec<u8>>,
}

impl Link {
    pub(crate) fn new(ws: WebSocketStream<TcpStream>) -> Self {
        Self { ws, frames: FrameDecoder::new(), header: Some(Vec::new()) }
    }

    /// The next complete frame. Cancel-safe: bytes already received stay buffered if the future is dropped.
    pub(crate) async fn next_frame(&mut self) -> Result<BytesMut, WireError> {
        loop {
            if self.header.is_none()
                && let Some(frame) = self.frames.decode_frame()
            {
                return Ok(frame);
            }
            let data = match self.ws.next().await {
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Close(_))) | None => return Err(WireError::Closed),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
            };
            match self.header.as_mut() {
                None => self.frames.feed(&data),
                Some(pending) => {
                    pending.extend_from_slice(&data);
                    if let Some(rest) = strip_header(pending)? {
                        self.frames.feed(&rest);
                        self.header = None;
                    }
                }
            }
        }
    }

    /// Sends one frame with the given payload.
    pub(crate) async fn send_frame(&mut self, payload: &[u8]) -> Result<(), WireError> {
        let framed = encode_frame(payload, None).map_err(|_| WireError::TooLarge)?;
        self.ws.send(Message::Binary(Bytes::from(framed))).await?;
        Ok(())
    }

    /// Sends already framed bytes.
    pub(crate) async fn send_raw(&mut self, framed: Vec<u8>) -> Result<(), WireError> {
        self.ws.send(Message::Binary(Bytes::from(framed))).await?;
        Ok(())
    }

    /// Ends the WebSocket with a close frame, then the TCP connection.
    pub(crate) async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// Returns the bytes after the connection header once it is complete (`None` while more is needed).
/// The header is an optional `ED\0\1` + 3-byte length + routing info, then `WA` + magic + dictionary version.
fn strip_header(pending: &[u8]) -> Result<Option<Vec<u8>>, WireError> {
    let mut p = pending;
    if p.len() >= 2 && &p[..2] == b"ED" {
        if p.len() < 7 {
            return Ok(None);
        }
        if &p[..4] != b"ED\x00\x01" {
            return Err(WireError::BadHeader);
        }
        let len = (usize::from(p[4]) << 16) | (usize::from(p[5]) << 8) | usize::from(p[6]);
        if len > MAX_PREINTRO {
            return Err(WireError::BadHeader);
        }
        if p.len() < 7 + len {
            return Ok(None);
        }
        p = &p[7 + len..];
    }
    if p.len() < WA_CONN_HEADER.len() {
        return if WA_CONN_HEADER.starts_with(p) { Ok(None) } else { Err(WireError::BadHeader) };
    }
    if p[..WA_CONN_HEADER.len()] != WA_CONN_HEADER {
        return Err(WireError::BadHeader);
    }
    Ok(Some(p[WA_CONN_HEADER.len()..].to_vec()))
}

/// The transport ciphers after the handshake. Each direction numbers its frames from zero.
pub(crate) struct Channel {
    read: NoiseCipher,
    write: NoiseCipher,
    read_counter: u32,
    write_counter: u32,
}

impl Channel {
    pub(crate) fn new(read: NoiseCipher, write: NoiseCipher) -> Self {
        Self { read, write, read_counter: 0, write_counter: 0 }
    }

    /// Encrypts a node into a ready-to-send frame.
    pub(crate) fn seal(&mut self, node: &Node) -> Result<Vec<u8>, WireError> {
        let mut plain = Vec::with_capacity(128);
        marshal_to_vec(node, &mut plain).map_err(|_| WireError::Decode)?;
        let ct = self.write.encrypt_with_counter(self.write_counter, &plain).map_err(|_| WireError::Decrypt)?;
        self.write_counter = self.write_counter.checked_add(1).ok_or(WireError::Counter)?;
        encode_frame(&ct, None).map_err(|_| WireError::TooLarge)
    }

    /// Decrypts a frame in place; the plaintext is then read with [`decode_node`].
    pub(crate) fn open(&mut self, frame: &mut BytesMut) -> Result<(), WireError> {
        self.read.decrypt_in_place_with_counter(self.read_counter, frame).map_err(|_| WireError::Decrypt)?;
        self.read_counter = self.read_counter.checked_add(1).ok_or(WireError::Counter)?;
        Ok(())
    }
}

/// Decodes a decrypted frame (flag byte, possibly zlib-compressed node) and hands the node to `f`.
pub(crate) fn with_node<T>(plain: &[u8], f: impl FnOnce(&NodeRef<'_>) -> T) -> Result<T, WireError> {
    let data = unpack(plain).map_err(|_| WireError::Decode)?;
    let node = unmarshal_ref(&data).map_err(|_| WireError::Decode)?;
    Ok(f(&node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_found_with_and_without_edge_routing() {
        let mut plain = WA_CONN_HEADER.to_vec();
        plain.extend_from_slice(&[0, 0, 1, 9]);
        assert_eq!(strip_header(&plain).unwrap(), Some(vec![0, 0, 1, 9]));

        let mut routed = b"ED\x00\x01\x00\x00\x03abc".to_vec();
        routed.extend_from_slice(&WA_CONN_HEADER);
        routed.push(7);
        assert_eq!(strip_header(&routed).unwrap(), Some(vec![7]));
        assert_eq!(strip_header(&routed[..8]).unwrap(), None, "a partial pre-intro waits for more");
        assert_eq!(strip_header(b"WA").unwrap(), None);
        assert!(strip_header(b"GET / HTTP/1.1").is_err());
    }
}
