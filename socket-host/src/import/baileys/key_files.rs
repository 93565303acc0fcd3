//! Converting one key file (pre-key, session, identity, sender key, app-state key or version, LID mapping) into
//! the engine store's records, or counting it as skipped.

use serde_json::{Map, Value};
use wakeeper_shared::domain::RecordKind;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::libsignal::store::record_helpers::new_pre_key_record;
use whatsapp_rust::wacore::store::traits::{AppStateSyncKey, LidPnMappingEntry};
use whatsapp_rust::waproto::whatsapp as wa;

use super::address::{all_digits, engine_address, sender_key_name};
use super::auth_files::FileKind;
use super::convert::Conversion;
use super::json::{
    ByteEncoding, bytes, decode_b64, fixed, int, key_pair, obj, opt_int, parse_json, public_key, u32_of,
    unwrap_buffered_json,
};
use super::sender_key::sender_key_record;
use super::session::session_record;
use super::{BaileysError, refuse, shown};
use crate::engine_store::codec::{encode_sync_key, mutation_mac_key, pre_key_id_key, sync_key_id_key};

/// Converts the file `name` of kind `kind` into `conversion`.
pub(super) fn convert_file(
    conversion: &mut Conversion,
    name: &str,
    kind: FileKind,
    content: &[u8],
) -> Result<(), BaileysError> {
    match kind {
        FileKind::Creds => {}
        FileKind::PreKey(id) => pre_key(conversion, name, &id, content)?,
        FileKind::Session(id) => session(conversion, name, &id, content)?,
        FileKind::IdentityKey(id) => identity_key(conversion, name, &id, content)?,
        FileKind::SenderKey(id) => sender_key(conversion, name, &id, content)?,
        FileKind::AppStateSyncKey(id) => app_state_sync_key(conversion, name, &id, content)?,
        FileKind::AppStateSyncVersion(collection) => app_state_version(conversion, name, &collection, content)?,
        FileKind::LidMapping(id) => lid_mapping(conversion, name, &id, content)?,
        FileKind::SenderKeyMemory => {
            conversion.skip("sender-key-memory files (the engine re-sends sender keys where needed)")
        }
        FileKind::DeviceList => conversion.skip("device-list files (the engine re-fetches device lists)"),
        FileKind::TcToken => conversion.skip("tctoken files (privacy tokens are re-issued by the server)"),
        FileKind::Unknown => {
            conversion.skip("files of an unknown kind");
            conversion.report.notes.push(format!("{}: unknown kind, not imported", shown(name)));
        }
    }
    Ok(())
}

/// The engine's address of the Signal address in a file name.
fn signal_address(name: &str, id: &str) -> Result<String, BaileysError> {
    engine_address(id).ok_or_else(|| refuse(name, "not a Signal address (user[_domain].device)"))
}

fn pre_key(conversion: &mut Conversion, name: &str, id: &str, content: &[u8]) -> Result<(), BaileysError> {
    let at = |p: String| refuse(name, p);
    let id: u32 = Some(id)
        .filter(|i| all_digits(i) && i.len() <= 10)
        .and_then(|i| i.parse().ok())
        .filter(|i| *i > 0)
        .ok_or_else(|| refuse(name, "pre-key id in the file name is not a positive number"))?;
    let v = parse_json(name, content)?;
    let pair = key_pair(obj(Some(&v), "the pre-key").map_err(at)?, "").map_err(at)?;
    let record = new_pre_key_record(id, &pair);
    conversion.put(
        RecordKind::PreKey,
        pre_key_id_key(id),
        whatsapp_rust::waproto::codec::pre_key_record_to_vec(&record),
    );
    Ok(())
}

fn session(conversion: &mut Conversion, name: &str, id: &str, content: &[u8]) -> Result<(), BaileysError> {
    let address = signal_address(name, id)?;
    let local = conversion.local;
    let record = buffered_record(name, content, |v| session_record(v, local))?;
    conversion.put_or_skip(RecordKind::Session, address, record, "empty session files");
    Ok(())
}

fn identity_key(conversion: &mut Conversion, name: &str, id: &str, content: &[u8]) -> Result<(), BaileysError> {
    let at = |p: String| refuse(name, p);
    let address = signal_address(name, id)?;
    let v = parse_json(name, content)?;
    let raw = bytes(Some(&v), "the identity key", ByteEncoding::BufferOrBase64).map_err(at)?;
    let key = public_key(&raw, "the identity key").map_err(at)?;
    conversion.put(RecordKind::Identity, address, key.public_key_bytes().to_vec());
    Ok(())
}

fn sender_key(conversion: &mut Conversion, name: &str, id: &str, content: &[u8]) -> Result<(), BaileysError> {
    let key = sender_key_name(id).ok_or_else(|| refuse(name, "not a sender-key name (group--user--device)"))?;
    let record = buffered_record(name, content, sender_key_record)?;
    conversion.put_or_skip(RecordKind::SenderKey, key, record, "empty sender-key files");
    Ok(())
}

/// A record converted by `convert` from a file that may hold its JSON as a Buffer of JSON text.
fn buffered_record(
    name: &str,
    content: &[u8],
    convert: impl FnOnce(&Value) -> Result<Option<Vec<u8>>, String>,
) -> Result<Option<Vec<u8>>, BaileysError> {
    let v = unwrap_buffered_json(name, parse_json(name, content)?)?;
    convert(&v).map_err(|p| refuse(name, p))
}

fn app_state_sync_key(conversion: &mut Conversion, name: &str, id: &str, content: &[u8]) -> Result<(), BaileysError> {
    let at = |p: String| refuse(name, p);
    let key_id = decode_b64(&id.replace("__", "/"))
        .filter(|k| !k.is_empty() && k.len() <= 64)
        .ok_or_else(|| refuse(name, "key id in the file name is not base64"))?;
    let v = parse_json(name, content)?;
    let o = obj(Some(&v), "the key").map_err(at)?;
    let key_data: [u8; 32] = fixed(o.get("keyData"), "keyData", ByteEncoding::BufferOrBase64).map_err(at)?;
    let fingerprint = sync_key_fingerprint(conversion, name, o)?;
    let timestamp = match opt_int(o.get("timestamp"), "timestamp").map_err(at)? {
        Some(t) => t,
        None => {
            conversion.report.notes.push(format!("{}: no timestamp; stored 0", shown(name)));
            0
        }
    };
    let key = AppStateSyncKey {
        key_data: key_data.to_vec(),
        fingerprint: whatsapp_rust::waproto::codec::app_state_sync_key_fingerprint_to_vec(&fingerprint),
        timestamp,
    };
    conversion.put(RecordKind::AppStateSyncKey, sync_key_id_key(&key_id), encode_sync_key(&key));
    if conversion.latest_sync_key.as_ref().is_none_or(|(t, _)| timestamp >= *t) {
        conversion.latest_sync_key = Some((timestamp, key_id));
    }
    Ok(())
}

/// An app-state sync key's `fingerprint` (stored empty, with a note, when there is none).
fn sync_key_fingerprint(
    conversion: &mut Conversion,
    name: &str,
    o: &Map<String, Value>,
) -> Result<wa::message::AppStateSyncKeyFingerprint, BaileysError> {
    let at = |p: String| refuse(name, p);
    let f = match o.get("fingerprint") {
        None | Some(Value::Null) => {
            conversion.report.notes.push(format!("{}: no fingerprint; stored empty", shown(name)));
            return Ok(wa::message::AppStateSyncKeyFingerprint {
                raw_id: None,
                current_index: None,
                device_indexes: vec![],
            });
        }
        f => obj(f, "fingerprint").map_err(at)?,
    };
    let device_indexes = match f.get("deviceIndexes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => {
            a.iter().map(|i| u32_of(Some(i), "fingerprint.deviceIndexes[]")).collect::<Result<_, _>>().map_err(at)?
        }
        Some(_) => return Err(refuse(name, "`fingerprint.deviceIndexes` must be an array")),
    };
    let small = |field: &str, path: &str| -> Result<Option<u32>, BaileysError> {
        opt_int(f.get(field), path)
            .map_err(at)?
            .map(|i| u32::try_from(i).map_err(|_| at(format!("`{path}` is out of range"))))
            .transpose()
    };
    Ok(wa::message::AppStateSyncKeyFingerprint {
        raw_id: small("rawId", "fingerprint.rawId")?,
        current_index: small("currentIndex", "fingerprint.currentIndex")?,
        device_indexes,
    })
}

fn app_state_version(
    conversion: &mut Conversion,
    name: &str,
    collection: &str,
    content: &[u8],
) -> Result<(), BaileysError> {
    let at = |p: String| refuse(name, p);
    if collection.is_empty()
        || collection.len() > 64
        || !collection.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        return Err(refuse(name, "not an app-state collection name"));
    }
    let v = parse_json(name, content)?;
    let o = obj(Some(&v), "the state").map_err(at)?;
    let version = int(o.get("version"), "version").map_err(at)?;
    let version = u64::try_from(version).map_err(|_| at("`version` is negative".into()))?;
    let hash: [u8; 128] = fixed(o.get("hash"), "hash", ByteEncoding::Buffer).map_err(at)?;
    let mut macs = Vec::new();
    if let Some(map) = o.get("indexValueMap").filter(|m| !m.is_null()) {
        for (index, entry) in obj(Some(map), "indexValueMap").map_err(at)? {
            let index_mac: [u8; 32] = decode_b64(index)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| at("an `indexValueMap` key is not a base64 32-byte index MAC".into()))?;
            let entry = obj(Some(entry), "indexValueMap[].").map_err(at)?;
            let value_mac: [u8; 32] =
                fixed(entry.get("valueMac"), "indexValueMap[].valueMac", ByteEncoding::BufferOrBase64).map_err(at)?;
            macs.push((index_mac, value_mac));
        }
    }
    let state = HashState { version, hash, ..HashState::default() };
    let json = serde_json::to_vec(&state).expect("hash state serializes");
    conversion.put(RecordKind::AppStateVersion, collection, json);
    for (index_mac, value_mac) in macs {
        conversion.put(RecordKind::AppStateMutationMac, mutation_mac_key(collection, &index_mac), value_mac.to_vec());
    }
    Ok(())
}

fn lid_mapping(conversion: &mut Conversion, name: &str, id: &str, content: &[u8]) -> Result<(), BaileysError> {
    if let Some(lid_user) = id.strip_suffix("_reverse") {
        if !all_digits(lid_user) {
            return Err(refuse(name, "not a LID user in the file name"));
        }
        // The reverse direction of a forward mapping; the engine derives it.
        conversion.skip("reverse LID mappings (derived from the forward ones)");
        return Ok(());
    }
    if !all_digits(id) {
        return Err(refuse(name, "not a phone-number user in the file name"));
    }
    let v = parse_json(name, content)?;
    // A string, as Baileys writes it; a number when a store kept the text and it was read back as JSON.
    let lid = match &v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        _ => String::new(),
    };
    if !all_digits(&lid) {
        return Err(refuse(name, "must hold a LID user (digits)"));
    }
    let entry = LidPnMappingEntry {
        lid: lid.clone(),
        phone_number: id.to_owned(),
        created_at: conversion.now_secs,
        updated_at: conversion.now_secs,
        learning_source: "other".into(),
    };
    conversion.put(RecordKind::LidMapping, lid, serde_json::to_vec(&entry).expect("entry serializes"));
    Ok(())
}
