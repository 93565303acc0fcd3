//! The whole-tenant export file: one encrypted blob of a snapshot, for backups and moving tenants.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use crate::crypto::Cipher;
use crate::domain::{CredentialSnapshot, MAX_RECORD_KEY_LEN, RecordKey, RecordKind, TenantId};

use super::frames::{read_u32, read_u64};

const EXPORT_MAGIC: &[u8; 16] = b"WAKEEPER-SNAP\0\0\x01";

/// Why an export file cannot be imported. Never carries record contents.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Not an export file, or a version this build does not read.
    #[error("not a wakeeper snapshot export (or an unsupported version)")]
    Format,
    /// The file was altered, truncated, or sealed with another data key.
    #[error("snapshot export does not decrypt (altered, truncated, or another data key)")]
    Undecryptable,
    /// The tenant id in the header is not valid.
    #[error("snapshot export names an invalid tenant id")]
    Tenant,
    /// Reading or writing the file failed.
    #[error("snapshot export i/o failed: {0}")]
    Io(#[from] io::Error),
}

/// What an export file's (unencrypted, authenticated) header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportHeader {
    /// The tenant the snapshot belongs to.
    pub tenant: TenantId,
    /// The snapshot's generation.
    pub generation: u64,
    /// Number of records.
    pub records: u64,
    /// When the export was made (unix millis).
    pub created_at: i64,
}

/// Serialises a tenant's whole snapshot into one encrypted blob (backups, moving tenants). The header (tenant,
/// generation, record count, time) is readable without the key but authenticated: it is the associated data of
/// the sealed body, so neither can be changed without the import failing.
pub fn export_snapshot(cipher: &Cipher, tenant: &TenantId, snapshot: &CredentialSnapshot) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(EXPORT_MAGIC);
    header.push(tenant.as_str().len() as u8);
    header.extend_from_slice(tenant.as_str().as_bytes());
    header.extend_from_slice(&snapshot.generation.to_le_bytes());
    header.extend_from_slice(&(snapshot.records.len() as u64).to_le_bytes());
    header.extend_from_slice(&crate::domain::now_millis().to_le_bytes());
    let mut body = Vec::new();
    for (key, value) in &snapshot.records {
        let kind = key.kind.as_str().as_bytes();
        body.push(kind.len() as u8);
        body.extend_from_slice(kind);
        body.extend_from_slice(&(key.key.len() as u32).to_le_bytes());
        body.extend_from_slice(key.key.as_bytes());
        body.extend_from_slice(&(value.len() as u64).to_le_bytes());
        body.extend_from_slice(value);
    }
    let sealed = cipher.seal_with_ad(&header, &body);
    let mut out = header;
    out.extend_from_slice(&sealed);
    out
}

/// Reads only the header of an export blob (no key needed; not yet authenticated).
pub fn export_header(bytes: &[u8]) -> Result<(ExportHeader, usize), ExportError> {
    if bytes.len() < EXPORT_MAGIC.len() + 1 || &bytes[..EXPORT_MAGIC.len()] != EXPORT_MAGIC {
        return Err(ExportError::Format);
    }
    let tl = bytes[EXPORT_MAGIC.len()] as usize;
    let t_start = EXPORT_MAGIC.len() + 1;
    let tenant = bytes.get(t_start..t_start + tl).ok_or(ExportError::Format)?;
    let tenant = std::str::from_utf8(tenant).ok().and_then(|t| TenantId::parse(t).ok()).ok_or(ExportError::Tenant)?;
    let p = t_start + tl;
    let generation = read_u64(bytes, p).ok_or(ExportError::Format)?;
    let records = read_u64(bytes, p + 8).ok_or(ExportError::Format)?;
    let created_at = read_u64(bytes, p + 16).ok_or(ExportError::Format)? as i64;
    Ok((ExportHeader { tenant, generation, records, created_at }, p + 24))
}

/// Opens an export blob made by [`export_snapshot`] with the same data key.
pub fn import_snapshot(cipher: &Cipher, bytes: &[u8]) -> Result<(ExportHeader, CredentialSnapshot), ExportError> {
    let (header, header_len) = export_header(bytes)?;
    let body =
        cipher.open_with_ad(&bytes[..header_len], &bytes[header_len..]).map_err(|_| ExportError::Undecryptable)?;
    let mut snapshot = CredentialSnapshot { generation: header.generation, ..Default::default() };
    let mut p = 0usize;
    while p < body.len() {
        let kl = body[p] as usize;
        let kind = body
            .get(p + 1..p + 1 + kl)
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(RecordKind::parse)
            .ok_or(ExportError::Format)?;
        p += 1 + kl;
        let key_len = read_u32(&body, p).ok_or(ExportError::Format)? as usize;
        let key =
            body.get(p + 4..p + 4 + key_len).and_then(|k| std::str::from_utf8(k).ok()).ok_or(ExportError::Format)?;
        if key.len() > MAX_RECORD_KEY_LEN {
            return Err(ExportError::Format);
        }
        let key = RecordKey::new(kind, key);
        p += 4 + key_len;
        let value_len = read_u64(&body, p).ok_or(ExportError::Format)? as usize;
        let value = body.get(p + 8..(p + 8).saturating_add(value_len)).ok_or(ExportError::Format)?;
        p += 8 + value_len;
        snapshot.records.insert(key, value.to_vec());
    }
    if snapshot.records.len() as u64 != header.records {
        return Err(ExportError::Format);
    }
    Ok((header, snapshot))
}

/// Writes an export to `path` atomically (temp file 0600, fsync, rename, directory fsync).
pub fn write_export_file(
    path: &Path,
    cipher: &Cipher,
    tenant: &TenantId,
    snapshot: &CredentialSnapshot,
) -> Result<(), ExportError> {
    let bytes = export_snapshot(cipher, tenant, snapshot);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Reads and opens an export file.
pub fn read_export_file(path: &Path, cipher: &Cipher) -> Result<(ExportHeader, CredentialSnapshot), ExportError> {
    import_snapshot(cipher, &fs::read(path)?)
}
