//! The phone-number half of the link flow ("link with phone number instead"), as far as a fresh client can
//! tell: its `companion_hello` is answered with a pairing ref, so the engine hands out its 8-character code.
//! Nobody types that code on a phone here: completing a link by code is not simulated (links complete by
//! QR code through [`crate::SimHandle::pair`]).

use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::{Node, NodeRef};

/// The answer to a pairing-code request (`<iq xmlns="md"><link_code_companion_reg stage="companion_hello">`),
/// or `None` when `node` is not one. A request without its wrapped ephemeral key or phone number is refused
/// as WhatsApp does (`bad-request`).
pub(crate) fn companion_hello_answer(node: &NodeRef<'_>) -> Option<Node> {
    let reg = node.get_optional_child("link_code_companion_reg")?;
    if reg.get_attr("stage").is_none_or(|s| s.as_str() != "companion_hello") {
        return None;
    }
    let id = node.get_attr("id").map(|v| v.as_str().into_owned()).unwrap_or_default();
    let well_formed = reg.get_attr("jid").is_some_and(|j| j.as_str().ends_with("@s.whatsapp.net"))
        && reg
            .get_optional_child("link_code_pairing_wrapped_companion_ephemeral_pub")
            .and_then(|c| c.content_bytes())
            .is_some_and(|b| b.len() == 80)
        && reg
            .get_optional_child("companion_server_auth_key_pub")
            .and_then(|c| c.content_bytes())
            .is_some_and(|b| b.len() == 32);
    if !well_formed {
        return Some(
            NodeBuilder::new("iq")
                .attr("from", crate::iq::SERVER)
                .attr("id", id)
                .attr("type", "error")
                .children([NodeBuilder::new("error").attr("code", "400").attr("text", "bad-request").build()])
                .build(),
        );
    }
    let reference = {
        use rand::Rng as _;
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes()
    };
    Some(
        crate::iq::result(&id)
            .children([NodeBuilder::new("link_code_companion_reg")
                .children([NodeBuilder::new("link_code_pairing_ref").bytes(reference).build()])
                .build()])
            .build(),
    )
}
