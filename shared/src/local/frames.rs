//! The on-disk format of a working copy: file magics and headers, sealed record frames, base parsing, the
//! journal walk and its checksum. Pure functions over bytes (plus the two small file helpers they need).

use std::fs::File;
use std::io;
use std::path::Path;

use crate::crypto::{Cipher, SEAL_OVERHEAD};
use crate::domain::{MAX_RECORD_KEY_LEN, MAX_RECORD_VALUE_LEN, RecordKey, RecordKind, TenantId};

use super::records::{RecordLoc, Segment};
use super::working_copy::{WorkingCopyError, io_err};

pub(super) const BASE_FILE: &str = "base.wkc";
pub(super) const JOURNAL_FILE: &str = "journal.wkc";
/// The lease epoch the copy's writes are made under, in decimal.
pub(super) const EPOCH_FILE: &str = "epoch";
pub(super) const TMP_SUFFIX: &str = ".tmp";

pub(super) const BASE_MAGIC: &[u8; 8] = b"WKCBASE1";
pub(super) const BASE_END: &[u8; 8] = b"WKCEND01";
pub(super) const JOURNAL_MAGIC: &[u8; 8] = b"WKCJRNL1";
/// The journal header of a hydrated copy not yet made durable (see [`WorkingCopy::write_hydrated_base`]).
pub(super) const JOURNAL_MAGIC_UNSYNCED: &[u8; 8] = b"WKCJRNLU";
/// magic, base id, generation, record count.
pub(super) const BASE_HEADER_LEN: usize = 8 + 8 + 8 + 8;
/// trailer magic, crc32 of everything before the crc.
pub(super) const BASE_TRAILER_LEN: usize = 8 + 4;
/// magic, base id, crc32 of both.
pub(super) const JOURNAL_HEADER_LEN: usize = 8 + 8 + 4;
/// body length, crc32 of the body.
pub(super) const ENTRY_HEADER_LEN: usize = 4 + 4;
/// generation, record count.
pub(super) const ENTRY_BODY_MIN: usize = 8 + 4;

pub(super) const OP_DELETE: u8 = 0;
pub(super) const OP_PUT: u8 = 1;

pub(super) fn frame_ad(tenant: &TenantId) -> Vec<u8> {
    let mut ad = b"wakeeper/working-copy/v1\0".to_vec();
    ad.extend_from_slice(tenant.as_str().as_bytes());
    ad
}

/// Refuses a record no store could hold, before anything of it is written (and so before the engine's write
/// is acknowledged): a key over [`MAX_RECORD_KEY_LEN`], a value over [`MAX_RECORD_VALUE_LEN`].
pub(super) fn check_record(key: &RecordKey, value: Option<&[u8]>) -> Result<(), WorkingCopyError> {
    if key.key.len() > MAX_RECORD_KEY_LEN {
        return Err(WorkingCopyError::Invalid(format!(
            "a {} key is longer than {MAX_RECORD_KEY_LEN} bytes",
            key.kind.as_str()
        )));
    }
    if let Some(v) = value.filter(|v| v.len() > MAX_RECORD_VALUE_LEN) {
        return Err(WorkingCopyError::Invalid(format!(
            "a {} record of {} bytes is longer than the {MAX_RECORD_VALUE_LEN} bytes a record may hold",
            key.kind.as_str(),
            v.len()
        )));
    }
    Ok(())
}

pub(super) fn len_u32(n: usize) -> Result<u32, WorkingCopyError> {
    u32::try_from(n).map_err(|_| WorkingCopyError::Invalid("record too large".into()))
}

pub(super) fn loc(segment: Segment, offset: usize, len: usize) -> Result<RecordLoc, WorkingCopyError> {
    Ok(RecordLoc {
        offset: u32::try_from(offset).map_err(|_| WorkingCopyError::Corrupt("file larger than 4 GiB".into()))?,
        len: len_u32(len)?,
        segment,
    })
}

/// Plaintext of a record frame: kind name, key, op, value.
pub(super) fn encode_frame_plain(out: &mut Vec<u8>, key: &RecordKey, value: Option<&[u8]>) {
    out.clear();
    let kind = key.kind.as_str().as_bytes();
    out.push(kind.len() as u8);
    out.extend_from_slice(kind);
    out.extend_from_slice(&(key.key.len() as u16).to_le_bytes());
    out.extend_from_slice(key.key.as_bytes());
    match value {
        Some(v) => {
            out.push(OP_PUT);
            out.extend_from_slice(v);
        }
        None => out.push(OP_DELETE),
    }
}

pub(super) fn open_frame(
    cipher: &Cipher,
    ad: &[u8],
    sealed: &[u8],
) -> Result<(RecordKey, Option<Vec<u8>>), WorkingCopyError> {
    let corrupt = |what: &str| WorkingCopyError::Corrupt(format!("record frame {what}"));
    let mut plain = cipher.open_with_ad(ad, sealed).map_err(|_| corrupt("does not decrypt"))?;
    let kind_len = *plain.first().ok_or_else(|| corrupt("is empty"))? as usize;
    let kind_end = 1 + kind_len;
    let kind = plain
        .get(1..kind_end)
        .and_then(|k| std::str::from_utf8(k).ok())
        .and_then(RecordKind::parse)
        .ok_or_else(|| corrupt("has an unknown kind"))?;
    let key_len = plain.get(kind_end..kind_end + 2).ok_or_else(|| corrupt("is truncated"))?;
    let key_len = u16::from_le_bytes([key_len[0], key_len[1]]) as usize;
    let key_start = kind_end + 2;
    let key = plain
        .get(key_start..key_start + key_len)
        .and_then(|k| std::str::from_utf8(k).ok())
        .ok_or_else(|| corrupt("has a malformed key"))?
        .to_owned();
    let op_at = key_start + key_len;
    let value = match plain.get(op_at) {
        Some(&OP_PUT) => {
            plain.drain(..=op_at);
            Some(plain)
        }
        Some(&OP_DELETE) if plain.len() == op_at + 1 => None,
        _ => return Err(corrupt("has a malformed operation")),
    };
    Ok((RecordKey { kind, key }, value))
}

pub(super) struct ParsedBase {
    pub(super) base_id: u64,
    pub(super) generation: u64,
    /// (offset, len) of each sealed frame.
    pub(super) frames: Vec<(usize, usize)>,
}

pub(super) fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

pub(super) fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

pub(super) fn parse_base(bytes: &[u8]) -> Result<ParsedBase, WorkingCopyError> {
    let corrupt = |what: &str| WorkingCopyError::Corrupt(format!("base file {what}"));
    if bytes.len() < BASE_HEADER_LEN + BASE_TRAILER_LEN || &bytes[..8] != BASE_MAGIC {
        return Err(corrupt("has no valid header"));
    }
    let crc_at = bytes.len() - 4;
    if &bytes[crc_at - 8..crc_at] != BASE_END || read_u32(bytes, crc_at) != Some(crc32(&bytes[..crc_at])) {
        return Err(corrupt("fails its checksum"));
    }
    let base_id = read_u64(bytes, 8).expect("header length checked");
    let generation = read_u64(bytes, 16).expect("header length checked");
    let count = read_u64(bytes, 24).expect("header length checked");
    let records_end = crc_at - 8;
    let mut frames = Vec::with_capacity(count.min(1 << 20) as usize);
    let mut at = BASE_HEADER_LEN;
    for _ in 0..count {
        let len = read_u32(&bytes[..records_end], at).ok_or_else(|| corrupt("is truncated"))? as usize;
        let start = at + 4;
        if len < SEAL_OVERHEAD || start + len > records_end {
            return Err(corrupt("has a malformed record"));
        }
        frames.push((start, len));
        at = start + len;
    }
    if at != records_end {
        return Err(corrupt("has trailing bytes"));
    }
    Ok(ParsedBase { base_id, generation, frames })
}

pub(super) fn journal_base_id(bytes: &[u8]) -> Option<u64> {
    if bytes.len() < JOURNAL_HEADER_LEN || (&bytes[..8] != JOURNAL_MAGIC && &bytes[..8] != JOURNAL_MAGIC_UNSYNCED) {
        return None;
    }
    let crc = read_u32(bytes, 16)?;
    (crc == crc32(&bytes[..16])).then(|| read_u64(bytes, 8)).flatten()
}

/// Whether the tenant's journal carries the unsynced mark of a hydration not yet made durable. Any journal
/// with the mark counts, even one naming another base: hydration writes the journal before the base.
pub(super) fn journal_is_unsynced(dir: &Path) -> Result<bool, WorkingCopyError> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    match File::open(dir.join(JOURNAL_FILE)).and_then(|mut f| f.read_exact(&mut magic)) {
        Ok(()) => Ok(&magic == JOURNAL_MAGIC_UNSYNCED),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof) => Ok(false),
        Err(e) => Err(WorkingCopyError::Io { op: "reading the journal header", source: e }),
    }
}

pub(super) struct JournalEntry {
    pub(super) generation: u64,
    pub(super) frames: Vec<(usize, usize)>,
}

pub(super) struct JournalWalk {
    pub(super) entries: Vec<JournalEntry>,
    /// End of the last whole, valid entry.
    pub(super) valid_len: usize,
}

/// Walks the journal's entries, stopping at the first that is incomplete, fails its checksum, or does not raise
/// the generation: under fdatasync-per-append only the last entry can be torn by a crash.
pub(super) fn walk_journal(bytes: &[u8], base_generation: u64) -> JournalWalk {
    let mut entries = Vec::new();
    let mut at = JOURNAL_HEADER_LEN;
    let mut generation = base_generation;
    while let Some(body_len) = read_u32(bytes, at) {
        let Some(crc) = read_u32(bytes, at + 4) else { break };
        let body_start = at + ENTRY_HEADER_LEN;
        let body_len = body_len as usize;
        if body_len < ENTRY_BODY_MIN || body_start + body_len > bytes.len() {
            break;
        }
        let body = &bytes[body_start..body_start + body_len];
        if crc32(body) != crc {
            break;
        }
        let entry_generation = read_u64(body, 0).expect("body length checked");
        let count = read_u32(body, 8).expect("body length checked") as usize;
        if entry_generation <= generation {
            break;
        }
        let mut frames = Vec::with_capacity(count.min(1 << 16));
        let mut p = ENTRY_BODY_MIN;
        let mut ok = true;
        for _ in 0..count {
            let Some(len) = read_u32(body, p) else {
                ok = false;
                break;
            };
            let len = len as usize;
            if len < SEAL_OVERHEAD || p + 4 + len > body.len() {
                ok = false;
                break;
            }
            frames.push((body_start + p + 4, len));
            p += 4 + len;
        }
        if !ok || p != body.len() {
            break;
        }
        generation = entry_generation;
        entries.push(JournalEntry { generation, frames });
        at = body_start + body_len;
    }
    JournalWalk { entries, valid_len: at }
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), WorkingCopyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing a directory"))
}

pub(super) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    u64::from_le_bytes(b)
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32 (IEEE): detects a torn or bit-rotted journal entry before decryption is even tried.
pub(super) fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

// ---------------------------------------------------------------------------------------------------------------
// Whole-tenant export file
// ---------------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
