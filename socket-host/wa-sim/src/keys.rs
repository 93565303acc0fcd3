//! The simulator's server identity: a root signing key, an intermediate certificate and the Noise static
//! key the handshake proves possession of.
//!
//! WhatsApp's chain is `root -> intermediate -> leaf(static key)`, each step an XEdDSA signature over the
//! encoded certificate details. Ours has the same shape and is really signed, so a client that pins our root
//! (instead of WhatsApp's) could verify it; the engine's test builds skip the check altogether.

use sha2::{Digest, Sha256};
use whatsapp_rust::buffa::{Message, MessageField};
use whatsapp_rust::wacore::libsignal::protocol::{KeyPair, PrivateKey};
use whatsapp_rust::waproto::whatsapp as wa;

/// WhatsApp's intermediate certificate names the root by this serial; the engine checks it.
const ROOT_SERIAL: u32 = 0;
const INTERMEDIATE_SERIAL: u32 = 1;
const LEAF_SERIAL: u32 = 2;
/// Certificates are valid from a day before start for ten years: long enough for any test run, and the
/// client caches the window to decide whether Noise IK may be attempted.
const VALID_BEFORE_SECS: u64 = 24 * 3600;
const VALID_FOR_SECS: u64 = 10 * 365 * 24 * 3600;

pub(crate) struct ServerIdentity {
    root: KeyPair,
    static_key: KeyPair,
    static_public: [u8; 32],
    cert_chain: Vec<u8>,
}

impl ServerIdentity {
    /// Fresh random keys: each simulator instance is a different "server".
    pub(crate) fn generate() -> Self {
        let mut rng = rand::rng();
        let root = KeyPair::generate(&mut rng);
        let intermediate = KeyPair::generate(&mut rng);
        let static_key = KeyPair::generate(&mut rng);
        Self::assemble(root, intermediate, static_key)
    }

    /// Keys derived from a seed, so a restarted simulator process is the same server: clients that cached
    /// its static key keep using Noise IK, and an exported root key stays valid.
    pub(crate) fn from_seed(seed: &[u8; 32]) -> Self {
        Self::assemble(derive(seed, b"root"), derive(seed, b"intermediate"), derive(seed, b"static"))
    }

    fn assemble(root: KeyPair, intermediate: KeyPair, static_key: KeyPair) -> Self {
        let now = now_secs();
        let not_before = now.saturating_sub(VALID_BEFORE_SECS);
        let not_after = now + VALID_FOR_SECS;
        let intermediate_public = public_bytes(&intermediate);
        let static_public = public_bytes(&static_key);
        let intermediate_cert =
            certificate(&root, INTERMEDIATE_SERIAL, ROOT_SERIAL, &intermediate_public, not_before, not_after);
        let leaf_cert =
            certificate(&intermediate, LEAF_SERIAL, INTERMEDIATE_SERIAL, &static_public, not_before, not_after);
        let cert_chain =
            wa::CertChain { leaf: MessageField::some(leaf_cert), intermediate: MessageField::some(intermediate_cert) }
                .encode_to_vec();
        Self { root, static_key, static_public, cert_chain }
    }

    pub(crate) fn root_public(&self) -> [u8; 32] {
        public_bytes(&self.root)
    }

    pub(crate) fn static_public(&self) -> &[u8; 32] {
        &self.static_public
    }

    pub(crate) fn static_private(&self) -> &[u8; 32] {
        self.static_key.private_key.serialize()
    }

    pub(crate) fn cert_chain(&self) -> &[u8] {
        &self.cert_chain
    }
}

fn certificate(
    issuer: &KeyPair,
    serial: u32,
    issuer_serial: u32,
    key: &[u8; 32],
    not_before: u64,
    not_after: u64,
) -> wa::cert_chain::NoiseCertificate {
    let details = wa::cert_chain::noise_certificate::Details {
        serial: Some(serial),
        issuer_serial: Some(issuer_serial),
        key: Some(key.to_vec()),
        not_before: Some(not_before),
        not_after: Some(not_after),
    }
    .encode_to_vec();
    let signature = issuer.calculate_signature(&details, &mut rand::rng()).expect("signing with a curve25519 key");
    wa::cert_chain::NoiseCertificate { details: Some(details), signature: Some(signature.to_vec()) }
}

fn derive(seed: &[u8; 32], label: &[u8]) -> KeyPair {
    let mut h = Sha256::new();
    h.update(b"wa-sim server key v1\0");
    h.update(label);
    h.update(seed);
    let private: [u8; 32] = h.finalize().into();
    let private = PrivateKey::deserialize(&private).expect("any 32 bytes are a curve25519 private key");
    KeyPair::try_from(private).expect("a valid private key has a public key")
}

pub(crate) fn public_bytes(kp: &KeyPair) -> [u8; 32] {
    kp.public_key.public_key_bytes().try_into().expect("curve25519 public keys are 32 bytes")
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use whatsapp_rust::wacore::libsignal::protocol::PublicKey;

    fn verify(
        issuer: &[u8; 32],
        cert: &wa::cert_chain::NoiseCertificate,
    ) -> wa::cert_chain::noise_certificate::Details {
        let details = cert.details.as_deref().unwrap();
        let pk = PublicKey::from_djb_public_key_bytes(issuer).unwrap();
        assert!(pk.verify_signature(details, cert.signature.as_deref().unwrap()), "signature must verify");
        wa::cert_chain::noise_certificate::Details::decode_from_slice(details).unwrap()
    }

    #[test]
    fn chain_is_signed_by_the_exported_root_and_names_the_static_key() {
        let id = ServerIdentity::generate();
        let chain = wa::CertChain::decode_from_slice(id.cert_chain()).unwrap();
        let inter = verify(&id.root_public(), chain.intermediate.as_option().unwrap());
        assert_eq!(inter.issuer_serial, Some(ROOT_SERIAL));
        let inter_key: [u8; 32] = inter.key.clone().unwrap().try_into().unwrap();
        let leaf = verify(&inter_key, chain.leaf.as_option().unwrap());
        assert_eq!(leaf.issuer_serial, inter.serial);
        assert_eq!(leaf.key.as_deref(), Some(&id.static_public()[..]));
        let now = now_secs();
        assert!(leaf.not_before.unwrap() < now && now < leaf.not_after.unwrap());
    }

    #[test]
    fn a_foreign_root_does_not_verify() {
        let a = ServerIdentity::generate();
        let b = ServerIdentity::generate();
        let chain = wa::CertChain::decode_from_slice(a.cert_chain()).unwrap();
        let inter = chain.intermediate.as_option().unwrap();
        let pk = PublicKey::from_djb_public_key_bytes(&b.root_public()).unwrap();
        assert!(!pk.verify_signature(inter.details.as_deref().unwrap(), inter.signature.as_deref().unwrap()));
    }

    #[test]
    fn seeded_identities_are_stable() {
        let seed = [7u8; 32];
        let a = ServerIdentity::from_seed(&seed);
        let b = ServerIdentity::from_seed(&seed);
        assert_eq!(a.root_public(), b.root_public());
        assert_eq!(a.static_public(), b.static_public());
        assert_ne!(a.root_public(), ServerIdentity::from_seed(&[8u8; 32]).root_public());
    }
}
