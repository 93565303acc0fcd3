//! Signal addresses and sender-key names: Baileys' file-name forms rewritten as the engine writes them.

use std::str::FromStr;

use whatsapp_rust::wacore_binary::Jid;

/// 1 to 32 ASCII digits: a phone or LID user, a device number, an id.
pub(super) fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit())
}

/// A Baileys Signal address (`user[_domain].device`) as the engine's protocol address (`user[:device]@server.0`).
pub fn engine_address(baileys: &str) -> Option<String> {
    let (name, device) = baileys.rsplit_once('.')?;
    if !all_digits(device) || device.len() > 5 {
        return None;
    }
    let device: u16 = device.parse().ok()?;
    let (user, server) = match name.split_once('_') {
        None => (name, "c.us"),
        Some((user, "1")) => (user, "lid"),
        Some((user, "128")) => (user, "hosted"),
        Some((user, "129")) => (user, "hosted.lid"),
        Some(_) => return None,
    };
    if !all_digits(user) {
        return None;
    }
    Some(if device == 0 { format!("{user}@{server}.0") } else { format!("{user}:{device}@{server}.0") })
}

/// `group--user[_domain]--device` (the file-name form of `group::user::device`) as the engine's sender-key name
/// `group:user[:device]@server.0`.
pub(super) fn sender_key_name(id: &str) -> Option<String> {
    let mut parts = id.rsplitn(3, "--");
    let (device, user, group) = (parts.next()?, parts.next()?, parts.next()?);
    let group = Jid::from_str(group).ok().filter(|g| !g.user.is_empty())?;
    let address = engine_address(&format!("{user}.{device}"))?;
    Some(format!("{group}:{address}"))
}
