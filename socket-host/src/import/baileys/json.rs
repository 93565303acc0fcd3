//! Reading the JSON Baileys writes: Buffers in their three forms, 64-bit integers in theirs, objects and keys.
//! Every accessor names the field path in its error; none ever prints a value.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};
use whatsapp_rust::wacore::libsignal::protocol::{KeyPair, PrivateKey, PublicKey};

use super::{BaileysError, refuse};

/// How a byte field may be written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ByteEncoding {
    /// Only as a Buffer (`{"type":"Buffer","data":...}` or a Uint8Array's `{"0":..,"1":..}`).
    Buffer,
    /// As a Buffer or a base64 string (protobuf JSON, libsignal's own serialisation).
    BufferOrBase64,
}

pub(super) fn decode_b64(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s.trim()).ok()
}

pub(super) fn small_int_bytes(values: &[&Value]) -> Option<Vec<u8>> {
    values.iter().map(|v| v.as_u64().filter(|n| *n <= 255).map(|n| n as u8)).collect()
}

/// Decodes a byte field. `Ok(None)` when absent or null.
pub(super) fn opt_bytes(v: Option<&Value>, path: &str, enc: ByteEncoding) -> Result<Option<Vec<u8>>, String> {
    let Some(v) = v else { return Ok(None) };
    match v {
        Value::Null => Ok(None),
        Value::String(s) if enc == ByteEncoding::BufferOrBase64 => {
            decode_b64(s).map(Some).ok_or_else(|| format!("`{path}` is not valid base64"))
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("Buffer") => match o.get("data") {
            Some(Value::String(s)) => {
                decode_b64(s).map(Some).ok_or_else(|| format!("`{path}` is a Buffer whose data is not valid base64"))
            }
            Some(Value::Array(a)) => small_int_bytes(&a.iter().collect::<Vec<_>>())
                .map(Some)
                .ok_or_else(|| format!("`{path}` is a Buffer whose data has values outside 0-255")),
            _ => Err(format!("`{path}` is a Buffer without base64 or byte-array data")),
        },
        // A Uint8Array that went through JSON.stringify: {"0": n, "1": n, ...}.
        Value::Object(o) if !o.is_empty() && o.keys().all(|k| k.parse::<usize>().is_ok()) => {
            let mut ordered: Vec<(usize, &Value)> = o.iter().map(|(k, v)| (k.parse().expect("checked"), v)).collect();
            ordered.sort_by_key(|(i, _)| *i);
            if ordered.iter().enumerate().any(|(i, (k, _))| i != *k) {
                return Err(format!("`{path}` is a byte map with gaps in its indexes"));
            }
            small_int_bytes(&ordered.iter().map(|(_, v)| *v).collect::<Vec<_>>())
                .map(Some)
                .ok_or_else(|| format!("`{path}` is a byte map with values outside 0-255"))
        }
        _ => Err(match enc {
            ByteEncoding::Buffer => {
                format!("`{path}` must be a Buffer ({{\"type\":\"Buffer\",\"data\":\"<base64>\"}})")
            }
            ByteEncoding::BufferOrBase64 => format!("`{path}` must be a Buffer or a base64 string"),
        }),
    }
}

pub(super) fn bytes(v: Option<&Value>, path: &str, enc: ByteEncoding) -> Result<Vec<u8>, String> {
    opt_bytes(v, path, enc)?.ok_or_else(|| format!("`{path}` is missing"))
}

pub(super) fn fixed<const N: usize>(v: Option<&Value>, path: &str, enc: ByteEncoding) -> Result<[u8; N], String> {
    let b = bytes(v, path, enc)?;
    let len = b.len();
    b.try_into().map_err(|_| format!("`{path}` must be {N} bytes (got {len})"))
}

/// An integer: a JSON number, a decimal string (protobuf JSON writes 64-bit numbers so), or a `Long`
/// (`{"low":..,"high":..}`). `Ok(None)` when absent or null.
pub(super) fn opt_int(v: Option<&Value>, path: &str) -> Result<Option<i64>, String> {
    let Some(v) = v else { return Ok(None) };
    let bad = || format!("`{path}` must be an integer");
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
            _ => Err(bad()),
        },
        Value::String(s) => s.trim().parse::<i64>().map(Some).map_err(|_| bad()),
        Value::Object(o) => {
            let low = o.get("low").and_then(Value::as_i64).ok_or_else(bad)?;
            let high = o.get("high").and_then(Value::as_i64).ok_or_else(bad)?;
            Ok(Some(((high as u32 as u64) << 32 | (low as u32 as u64)) as i64))
        }
        _ => Err(bad()),
    }
}

pub(super) fn int(v: Option<&Value>, path: &str) -> Result<i64, String> {
    opt_int(v, path)?.ok_or_else(|| format!("`{path}` is missing"))
}

pub(super) fn u32_of(v: Option<&Value>, path: &str) -> Result<u32, String> {
    u32::try_from(int(v, path)?).map_err(|_| format!("`{path}` is out of range"))
}

pub(super) fn obj<'a>(v: Option<&'a Value>, path: &str) -> Result<&'a Map<String, Value>, String> {
    match v {
        Some(Value::Object(o)) => Ok(o),
        None | Some(Value::Null) => Err(format!("`{path}` is missing")),
        Some(_) => Err(format!("`{path}` must be an object")),
    }
}

pub(super) fn opt_str<'a>(v: Option<&'a Value>, path: &str) -> Result<Option<&'a str>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{path}` must be a string")),
    }
}

pub(super) fn parse_json(name: &str, content: &[u8]) -> Result<Value, BaileysError> {
    serde_json::from_slice(content).map_err(|e| {
        let what = if e.is_eof() { "truncated JSON" } else { "not valid JSON" };
        refuse(name, format!("{what} (line {}, column {})", e.line(), e.column()))
    })
}

/// A value that may have been stored as a Buffer holding JSON text (Baileys does so for sender keys).
pub(super) fn unwrap_buffered_json(name: &str, v: Value) -> Result<Value, BaileysError> {
    let is_buffer = matches!(&v, Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("Buffer"));
    if !is_buffer {
        return Ok(v);
    }
    let raw = bytes(Some(&v), "the content", ByteEncoding::Buffer).map_err(|p| refuse(name, p))?;
    parse_json(name, &raw)
}

/// A curve25519 key pair `{private, public}` (32 bytes each); the public half must be the private half's.
pub(super) fn key_pair(o: &Map<String, Value>, path: &str) -> Result<KeyPair, String> {
    let (private_path, public_path) = (join(path, "private"), join(path, "public"));
    let private: [u8; 32] = fixed(o.get("private"), &private_path, ByteEncoding::Buffer)?;
    let public: [u8; 32] = fixed(o.get("public"), &public_path, ByteEncoding::Buffer)?;
    let private = PrivateKey::deserialize(&private).map_err(|_| format!("`{private_path}` is not a curve25519 key"))?;
    let derived = private.public_key().map_err(|_| format!("`{private_path}` is not a curve25519 key"))?;
    if derived.public_key_bytes() != public {
        return Err(format!("`{public_path}` does not belong to `{private_path}`"));
    }
    Ok(KeyPair::new(derived, private))
}

/// A field path below `path` (`""`: the file's top level).
pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// A Signal public key written either raw (32) or with its type byte (33).
pub(super) fn public_key(b: &[u8], path: &str) -> Result<PublicKey, String> {
    match b.len() {
        32 => PublicKey::from_djb_public_key_bytes(b),
        33 => PublicKey::deserialize(b),
        n => return Err(format!("`{path}` must be a 32- or 33-byte public key (got {n} bytes)")),
    }
    .map_err(|_| format!("`{path}` is not a valid public key"))
}
