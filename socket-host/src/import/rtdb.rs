//! The tenant list from a Firebase Realtime Database JSON export.
//!
//! The Baileys host kept its tenants at `tenants/{id}` with a `whatsappConnected` flag (whether the restaurant
//! wants WhatsApp on). An export of the whole database (`{"tenants": {...}, ...}`) or of the `tenants` node alone
//! (`{"<id>": {...}}`) is accepted. Each tenant becomes a tenant-store record whose desired flag is
//! `whatsappConnected`; ids that are not valid tenant ids, and entries that are not objects, are reported and
//! skipped (the rest still import).

use std::fmt;
use std::io::Read;
use std::path::Path;

use serde_json::Value;
use wakeeper_shared::domain::TenantId;

/// Largest export accepted (checked before reading).
pub const MAX_EXPORT_BYTES: u64 = 256 * 1024 * 1024;

/// Why an export was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RtdbError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The export's path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The export is larger than [`MAX_EXPORT_BYTES`].
    #[error("{0} is larger than the {limit} MiB limit (not read)", limit = MAX_EXPORT_BYTES >> 20)]
    TooLarge(String),
    /// Not JSON, or no tenants object.
    #[error("not a Realtime Database export: {0}")]
    Format(String),
}

/// One tenant of the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantEntry {
    /// The tenant.
    pub id: TenantId,
    /// Its desired flag (`whatsappConnected`).
    pub desired: bool,
}

/// What the export holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenantList {
    /// The tenants to import, in id order.
    pub tenants: Vec<TenantEntry>,
    /// Entries skipped, with why (no values beyond the id, escaped and shortened).
    pub skipped: Vec<String>,
    /// Remarks (defaults applied).
    pub notes: Vec<String>,
}

impl fmt::Display for TenantList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let desired = self.tenants.iter().filter(|t| t.desired).count();
        writeln!(f, "  tenants: {} ({} desired, {} not)", self.tenants.len(), desired, self.tenants.len() - desired)?;
        for s in self.skipped.iter().take(200) {
            writeln!(f, "  skipped: {s}")?;
        }
        if self.skipped.len() > 200 {
            writeln!(f, "  skipped: ... and {} more", self.skipped.len() - 200)?;
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}

fn shown(id: &str) -> String {
    let escaped: String = id.escape_debug().collect();
    if escaped.chars().count() > 80 { format!("{}…", escaped.chars().take(80).collect::<String>()) } else { escaped }
}

/// Reads and parses an export file.
pub fn read_export(path: &Path) -> Result<TenantList, RtdbError> {
    let shown_path = path.display().to_string();
    let read_err = |e: std::io::Error| RtdbError::Read { path: shown_path.clone(), reason: e.to_string() };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(RtdbError::Read { path: shown_path, reason: "not a regular file".into() });
    }
    if meta.len() > MAX_EXPORT_BYTES {
        return Err(RtdbError::TooLarge(shown_path));
    }
    let mut raw = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path).map_err(read_err)?.take(MAX_EXPORT_BYTES + 1).read_to_end(&mut raw).map_err(read_err)?;
    if raw.len() as u64 > MAX_EXPORT_BYTES {
        return Err(RtdbError::TooLarge(shown_path));
    }
    parse_export(&raw)
}

/// Parses an export's content.
pub fn parse_export(raw: &[u8]) -> Result<TenantList, RtdbError> {
    let root: Value = serde_json::from_slice(raw).map_err(|e| {
        let what = if e.is_eof() { "truncated JSON" } else { "not valid JSON" };
        RtdbError::Format(format!("{what} (line {}, column {})", e.line(), e.column()))
    })?;
    let Value::Object(root) = root else {
        return Err(RtdbError::Format("the top level is not an object".into()));
    };
    let tenants = match root.get("tenants") {
        Some(Value::Object(t)) => t.clone(),
        Some(_) => return Err(RtdbError::Format("`tenants` is not an object".into())),
        // An export of the `tenants` node itself.
        None => root,
    };
    let mut out = TenantList::default();
    for (id, entry) in tenants {
        let Value::Object(entry) = entry else {
            out.skipped.push(format!("{}: not an object", shown(&id)));
            continue;
        };
        let parsed = match TenantId::parse(&id) {
            Ok(t) => t,
            Err(e) => {
                out.skipped.push(format!("{}: not a valid tenant id ({e})", shown(&id)));
                continue;
            }
        };
        let desired = match entry.get("whatsappConnected") {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            None | Some(Value::Null) => {
                out.notes.push(format!("{}: no whatsappConnected; imported as not desired", shown(&id)));
                false
            }
            Some(_) => {
                out.skipped.push(format!("{}: whatsappConnected is not a boolean", shown(&id)));
                continue;
            }
        };
        out.tenants.push(TenantEntry { id: parsed, desired });
    }
    out.tenants.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_database_exports_and_tenant_node_exports() {
        let whole = br#"{"tenants": {"pizzeria-1": {"whatsappConnected": true, "name": "P"},
            "cantina": {"whatsappConnected": false}}, "orders": {"x": 1}}"#;
        let list = parse_export(whole).unwrap();
        assert_eq!(list.tenants.len(), 2);
        assert_eq!(list.tenants[0], TenantEntry { id: TenantId::parse("cantina").unwrap(), desired: false });
        assert_eq!(list.tenants[1], TenantEntry { id: TenantId::parse("pizzeria-1").unwrap(), desired: true });
        assert!(list.skipped.is_empty());

        let node = br#"{"a1": {"whatsappConnected": "true"}}"#;
        assert!(parse_export(node).unwrap().tenants[0].desired);
    }

    #[test]
    fn invalid_ids_and_entries_are_skipped_not_fatal() {
        let raw = br#"{"tenants": {"ok-1": {"whatsappConnected": true}, "../etc": {"whatsappConnected": true},
            "has space": {"whatsappConnected": true}, "flag": true, "odd": {"whatsappConnected": 3},
            "quiet": {}}}"#;
        let list = parse_export(raw).unwrap();
        let ids: Vec<&str> = list.tenants.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["ok-1", "quiet"]);
        assert!(!list.tenants[1].desired);
        assert_eq!(list.skipped.len(), 4, "{:?}", list.skipped);
        assert!(list.skipped.iter().any(|s| s.starts_with("../etc: not a valid tenant id")));
        assert_eq!(list.notes.len(), 1);
    }

    #[test]
    fn broken_exports_are_refused() {
        assert!(
            matches!(parse_export(br#"{"tenants": {"a": {"#), Err(RtdbError::Format(m)) if m.contains("truncated"))
        );
        assert!(matches!(parse_export(b"[1,2]"), Err(RtdbError::Format(_))));
        assert!(matches!(parse_export(br#"{"tenants": 5}"#), Err(RtdbError::Format(_))));
    }
}
