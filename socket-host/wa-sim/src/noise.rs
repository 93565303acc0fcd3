//! The responder side of WhatsApp's Noise handshakes: XX for a client that does not know us yet, IK for a
//! client that cached our static key, and XXfallback when an IK attempt names a static key we do not hold
//! (the client then completes an XX-shaped exchange on the ephemeral it already sent).
//!
//! These are pure functions over handshake messages; the connection task moves the bytes.

use whatsapp_rust::buffa::{Message, MessageField};
use whatsapp_rust::wacore::handshake::{NoiseCipher, NoiseHandshake};
use whatsapp_rust::wacore::libsignal::protocol::KeyPair;
use whatsapp_rust::wacore_binary::consts::{
    NOISE_PATTERN_IK, NOISE_PATTERN_XX, NOISE_PATTERN_XXFALLBACK, WA_CONN_HEADER,
};
use whatsapp_rust::waproto::whatsapp as wa;

use crate::keys::{ServerIdentity, public_bytes};

/// Why a handshake could not complete. Carries no key material.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeFailure {
    #[error("handshake message is not a valid protobuf")]
    Decode,
    #[error("handshake message lacks `{0}`")]
    Missing(&'static str),
    #[error("`{0}` has the wrong length")]
    Length(&'static str),
    #[error("handshake cryptography failed at {0}")]
    Crypto(&'static str),
}

/// Which pattern a handshake completed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Full handshake: the client learnt our static key from us.
    Xx,
    /// Resumed handshake: the client already knew our static key.
    Ik,
    /// The client tried IK with a static key we do not hold and fell back.
    XxFallback,
}

/// The first handshake message of a client.
pub(crate) struct ClientHello {
    ephemeral: [u8; 32],
    /// Encrypted client static key and login payload, present on an IK attempt.
    ik: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientHello {
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, HandshakeFailure> {
        let msg = wa::HandshakeMessage::decode_from_slice(bytes).map_err(|_| HandshakeFailure::Decode)?;
        let hello = msg.client_hello.into_option().ok_or(HandshakeFailure::Missing("client_hello"))?;
        let ephemeral = hello
            .ephemeral
            .ok_or(HandshakeFailure::Missing("ephemeral"))?
            .try_into()
            .map_err(|_| HandshakeFailure::Length("ephemeral"))?;
        let ik = match (hello.r#static, hello.payload) {
            (Some(s), Some(p)) => Some((s, p)),
            _ => None,
        };
        Ok(Self { ephemeral, ik })
    }

    pub(crate) fn is_ik(&self) -> bool {
        self.ik.is_some()
    }
}

/// A completed handshake: who the client is and the transport ciphers.
pub(crate) struct Established {
    pub(crate) pattern: Pattern,
    /// The client's Noise static public key: the credential a registered device is known by.
    pub(crate) client_static: [u8; 32],
    /// The encoded `ClientPayload`.
    pub(crate) payload: Vec<u8>,
    pub(crate) read: NoiseCipher,
    pub(crate) write: NoiseCipher,
}

/// An XX (or XXfallback) exchange waiting for the client's `ClientFinish`.
pub(crate) struct PendingXx {
    noise: NoiseHandshake,
    ephemeral: KeyPair,
    pattern: Pattern,
}

/// Starts an XX-shaped exchange; returns the state and the `ServerHello` to send.
pub(crate) fn start_xx(
    server: &ServerIdentity,
    hello: &ClientHello,
    fallback: bool,
) -> Result<(PendingXx, Vec<u8>), HandshakeFailure> {
    let crypto = |_| HandshakeFailure::Crypto("server hello");
    let pattern_name = if fallback { NOISE_PATTERN_XXFALLBACK } else { NOISE_PATTERN_XX };
    let mut noise = NoiseHandshake::new(pattern_name, &WA_CONN_HEADER).map_err(crypto)?;
    noise.authenticate(&hello.ephemeral);
    let ephemeral = KeyPair::generate(&mut rand::rng());
    let eph_public = public_bytes(&ephemeral);
    noise.authenticate(&eph_public);
    noise.mix_shared_secret(ephemeral.private_key.serialize(), &hello.ephemeral).map_err(crypto)?;
    let enc_static = noise.encrypt(server.static_public()).map_err(crypto)?;
    noise.mix_shared_secret(server.static_private(), &hello.ephemeral).map_err(crypto)?;
    let enc_cert = noise.encrypt(server.cert_chain()).map_err(crypto)?;
    let reply = server_hello(eph_public, Some(enc_static), enc_cert);
    let pattern = if fallback { Pattern::XxFallback } else { Pattern::Xx };
    Ok((PendingXx { noise, ephemeral, pattern }, reply))
}

impl PendingXx {
    /// Reads the client's `ClientFinish` and derives the transport keys.
    pub(crate) fn finish(mut self, bytes: &[u8]) -> Result<Established, HandshakeFailure> {
        let msg = wa::HandshakeMessage::decode_from_slice(bytes).map_err(|_| HandshakeFailure::Decode)?;
        let finish = msg.client_finish.into_option().ok_or(HandshakeFailure::Missing("client_finish"))?;
        let enc_static = finish.r#static.ok_or(HandshakeFailure::Missing("static"))?;
        let enc_payload = finish.payload.ok_or(HandshakeFailure::Missing("payload"))?;
        let client_static: [u8; 32] = self
            .noise
            .decrypt(&enc_static)
            .map_err(|_| HandshakeFailure::Crypto("client static"))?
            .try_into()
            .map_err(|_| HandshakeFailure::Length("client static"))?;
        self.noise
            .mix_shared_secret(self.ephemeral.private_key.serialize(), &client_static)
            .map_err(|_| HandshakeFailure::Crypto("se"))?;
        let payload = self.noise.decrypt(&enc_payload).map_err(|_| HandshakeFailure::Crypto("client payload"))?;
        let (read, write) = self.noise.finish().map_err(|_| HandshakeFailure::Crypto("split"))?;
        Ok(Established { pattern: self.pattern, client_static, payload, read, write })
    }
}

/// What an IK attempt turns into.
pub(crate) enum IkOutcome {
    /// The client knew our static key: keys are derived, the `ServerHello` is ready to send.
    Accepted(Box<Established>, Vec<u8>),
    /// The client named a static key we do not hold: answer with XXfallback.
    Rejected,
}

/// Answers an IK `ClientHello`.
pub(crate) fn respond_ik(server: &ServerIdentity, hello: &ClientHello) -> Result<IkOutcome, HandshakeFailure> {
    let Some((enc_static, enc_payload)) = &hello.ik else {
        return Err(HandshakeFailure::Missing("static"));
    };
    let crypto = |_| HandshakeFailure::Crypto("ik");
    let mut noise = NoiseHandshake::new(NOISE_PATTERN_IK, &WA_CONN_HEADER).map_err(crypto)?;
    noise.authenticate(server.static_public());
    noise.authenticate(&hello.ephemeral);
    noise.mix_shared_secret(server.static_private(), &hello.ephemeral).map_err(crypto)?;
    // A client that cached another server's static key derived different keys: the AEAD tag fails here.
    let Ok(client_static) = noise.decrypt(enc_static) else {
        return Ok(IkOutcome::Rejected);
    };
    let client_static: [u8; 32] = client_static.try_into().map_err(|_| HandshakeFailure::Length("client static"))?;
    noise.mix_shared_secret(server.static_private(), &client_static).map_err(crypto)?;
    let Ok(payload) = noise.decrypt(enc_payload) else {
        return Ok(IkOutcome::Rejected);
    };
    let ephemeral = KeyPair::generate(&mut rand::rng());
    let eph_public = public_bytes(&ephemeral);
    noise.authenticate(&eph_public);
    noise.mix_shared_secret(ephemeral.private_key.serialize(), &hello.ephemeral).map_err(crypto)?;
    noise.mix_shared_secret(ephemeral.private_key.serialize(), &client_static).map_err(crypto)?;
    let enc_cert = noise.encrypt(server.cert_chain()).map_err(crypto)?;
    let reply = server_hello(eph_public, None, enc_cert);
    let (read, write) = noise.finish().map_err(crypto)?;
    let established = Established { pattern: Pattern::Ik, client_static, payload, read, write };
    Ok(IkOutcome::Accepted(Box::new(established), reply))
}

fn server_hello(ephemeral: [u8; 32], enc_static: Option<Vec<u8>>, enc_cert: Vec<u8>) -> Vec<u8> {
    wa::HandshakeMessage {
        server_hello: MessageField::some(wa::handshake_message::ServerHello {
            ephemeral: Some(ephemeral.to_vec()),
            r#static: enc_static,
            payload: Some(enc_cert),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use whatsapp_rust::wacore::handshake::{
        IkHandshakeState, IkServerHelloOutcome, XxFallbackHandshakeState, XxHandshakeState,
    };

    // The engine's own initiator state machines drive these: if the responder drifts from what the client
    // computes, the AEAD tags fail.

    fn round_trip(w: &NoiseCipher, r: &NoiseCipher) {
        let ct = w.encrypt_with_counter(0, b"ping").unwrap();
        let mut buf = ct;
        r.decrypt_in_place_with_counter(0, &mut buf).unwrap();
        assert_eq!(buf, b"ping");
    }

    #[test]
    fn xx_completes_with_the_engine_initiator() {
        let server = ServerIdentity::generate();
        let client_static = KeyPair::generate(&mut rand::rng());
        let mut client = XxHandshakeState::new(client_static.clone(), b"login".to_vec(), &WA_CONN_HEADER).unwrap();
        let hello = ClientHello::parse(&client.build_client_hello().unwrap()).unwrap();
        assert!(!hello.is_ik());
        let (pending, reply) = start_xx(&server, &hello, false).unwrap();
        let finish = client.read_server_hello_and_build_client_finish(&reply).unwrap();
        let est = pending.finish(&finish).unwrap();
        let out = client.finish().unwrap();
        assert_eq!(est.pattern, Pattern::Xx);
        assert_eq!(est.payload, b"login");
        assert_eq!(est.client_static, public_bytes(&client_static));
        assert_eq!(out.server_cert_chain.leaf_key, *server.static_public());
        round_trip(&out.write_cipher, &est.read);
        round_trip(&est.write, &out.read_cipher);
    }

    #[test]
    fn ik_completes_when_the_client_knows_our_key() {
        let server = ServerIdentity::generate();
        let client_static = KeyPair::generate(&mut rand::rng());
        let mut client =
            IkHandshakeState::new(client_static.clone(), *server.static_public(), b"resume".to_vec(), &WA_CONN_HEADER)
                .unwrap();
        let hello = ClientHello::parse(&client.build_client_hello().unwrap()).unwrap();
        assert!(hello.is_ik());
        let IkOutcome::Accepted(est, reply) = respond_ik(&server, &hello).unwrap() else {
            panic!("ik must be accepted");
        };
        let IkServerHelloOutcome::Continue(out) = client.read_server_hello(&reply).unwrap() else {
            panic!("client must continue");
        };
        assert_eq!(est.payload, b"resume");
        assert_eq!(est.client_static, public_bytes(&client_static));
        round_trip(&out.write_cipher, &est.read);
        round_trip(&est.write, &out.read_cipher);
    }

    #[test]
    fn ik_with_a_stale_server_key_falls_back_to_xx() {
        let stale = ServerIdentity::generate();
        let server = ServerIdentity::generate();
        let client_static = KeyPair::generate(&mut rand::rng());
        let mut client =
            IkHandshakeState::new(client_static.clone(), *stale.static_public(), b"p".to_vec(), &WA_CONN_HEADER)
                .unwrap();
        let hello = ClientHello::parse(&client.build_client_hello().unwrap()).unwrap();
        assert!(matches!(respond_ik(&server, &hello).unwrap(), IkOutcome::Rejected));
        let (pending, reply) = start_xx(&server, &hello, true).unwrap();
        let IkServerHelloOutcome::Fallback(inputs) = client.read_server_hello(&reply).unwrap() else {
            panic!("client must fall back");
        };
        let mut fb = XxFallbackHandshakeState::from_ik_failure(*inputs, &WA_CONN_HEADER).unwrap();
        let finish = fb.build_client_finish().unwrap();
        let est = pending.finish(&finish).unwrap();
        let out = fb.finish().unwrap();
        assert_eq!(est.pattern, Pattern::XxFallback);
        assert_eq!(est.payload, b"p");
        assert_eq!(out.server_cert_chain.leaf_key, *server.static_public());
        round_trip(&out.write_cipher, &est.read);
    }
}
