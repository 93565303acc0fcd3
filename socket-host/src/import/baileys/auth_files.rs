//! Collecting an auth state's files (from a folder or one by one) with their names and sizes checked, and
//! telling from a file's name what it holds.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::{BaileysError, MAX_FILE_BYTES, MAX_FILES, MAX_TOTAL_BYTES, refuse, shown};

/// Longest file name accepted.
const MAX_NAME_LEN: usize = 255;

/// The raw files of one auth state, by file name (`creds.json`, `pre-key-1.json`, ...), size-checked and with
/// names checked to be ones Baileys can have written.
#[derive(Debug, Default, Clone)]
pub struct AuthFiles {
    pub(super) files: BTreeMap<String, Vec<u8>>,
    total: u64,
    /// Notes about what was skipped while collecting the files.
    pub notes: Vec<String>,
}

/// Checks a file name is one `useMultiFileAuthState` can write: `[A-Za-z0-9@._+=-]`, ending in `.json`, not
/// hidden, short. Refuses anything path-like (`/`, `\`, `..`), so no name can point outside the auth state.
pub fn check_file_name(name: &str) -> Result<(), BaileysError> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '_' | '-' | '+' | '=');
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(refuse(name, "file name is empty or too long"));
    }
    if name.contains(['/', '\\', '\0']) || name.contains("..") || name.starts_with('.') {
        return Err(refuse(name, "path-like file name (no auth-state file has one)"));
    }
    if !name.chars().all(fine) {
        return Err(refuse(name, "file name has characters Baileys never writes"));
    }
    if !name.ends_with(".json") {
        return Err(refuse(name, "not a .json file"));
    }
    Ok(())
}

impl AuthFiles {
    /// Adds one file. Refuses a bad name, a duplicate, an oversized file, or going over the totals.
    pub fn insert(&mut self, name: &str, content: Vec<u8>) -> Result<(), BaileysError> {
        check_file_name(name)?;
        if content.len() as u64 > MAX_FILE_BYTES {
            return Err(refuse(name, format!("larger than the {} MiB limit", MAX_FILE_BYTES >> 20)));
        }
        if self.files.len() >= MAX_FILES {
            return Err(BaileysError::Source(format!("more than {MAX_FILES} files; not an auth state")));
        }
        self.total += content.len() as u64;
        if self.total > MAX_TOTAL_BYTES {
            return Err(BaileysError::Source(format!("auth state larger than {} MiB", MAX_TOTAL_BYTES >> 20)));
        }
        if self.files.insert(name.to_owned(), content).is_some() {
            return Err(refuse(name, "the same file appears twice"));
        }
        Ok(())
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are no files.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Reads a `useMultiFileAuthState` folder. Every entry is checked before it is read: symbolic links and
    /// path-like names are refused, sizes are checked from metadata (a 50 MB file is refused unread), and
    /// entries that are not auth files (sub-directories, hidden files, other extensions) are skipped with a note.
    pub fn read_dir(dir: &Path) -> Result<Self, BaileysError> {
        let unreadable = |e: std::io::Error| BaileysError::Source(format!("cannot read {}: {e}", dir.display()));
        let meta = std::fs::metadata(dir).map_err(unreadable)?;
        if !meta.is_dir() {
            return Err(BaileysError::Source(format!("{} is not a directory", dir.display())));
        }
        let mut out = AuthFiles::default();
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(unreadable)? {
            let entry = entry.map_err(unreadable)?;
            entries.push(entry);
            if entries.len() > MAX_FILES {
                return Err(BaileysError::Source(format!("more than {MAX_FILES} entries; not an auth state")));
            }
        }
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let raw_name = entry.file_name();
            let Some(name) = raw_name.to_str() else {
                return Err(refuse(&raw_name.to_string_lossy(), "file name is not UTF-8"));
            };
            // Not following links: the metadata is the entry's own.
            let meta = entry.metadata().map_err(unreadable)?;
            if meta.file_type().is_symlink() {
                return Err(refuse(name, "symbolic link; refusing to follow it out of the auth-state folder"));
            }
            if meta.is_dir() {
                out.notes.push(format!("skipped sub-directory {}", shown(name)));
                continue;
            }
            if name.starts_with('.') || !name.ends_with(".json") {
                out.notes.push(format!("skipped {} (not an auth-state file)", shown(name)));
                continue;
            }
            check_file_name(name)?;
            if !meta.is_file() {
                return Err(refuse(name, "not a regular file"));
            }
            if meta.len() > MAX_FILE_BYTES {
                return Err(refuse(
                    name,
                    format!("{} bytes, over the {} MiB limit (not read)", meta.len(), MAX_FILE_BYTES >> 20),
                ));
            }
            let file = std::fs::File::open(entry.path()).map_err(|e| refuse(name, format!("cannot open: {e}")))?;
            let mut content = Vec::with_capacity(meta.len() as usize);
            file.take(MAX_FILE_BYTES + 1)
                .read_to_end(&mut content)
                .map_err(|e| refuse(name, format!("cannot read: {e}")))?;
            out.insert(name, content)?;
        }
        Ok(out)
    }
}

/// What a Baileys file holds, from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FileKind {
    Creds,
    PreKey(String),
    Session(String),
    IdentityKey(String),
    SenderKey(String),
    SenderKeyMemory,
    AppStateSyncKey(String),
    AppStateSyncVersion(String),
    LidMapping(String),
    DeviceList,
    TcToken,
    Unknown,
}

/// Makes a [`FileKind`] from the id part of a file name.
type KindOf = fn(String) -> FileKind;

/// Longest prefixes first: `sender-key-memory-` before `sender-key-`.
const PREFIXES: [(&str, KindOf); 10] = [
    ("app-state-sync-version-", FileKind::AppStateSyncVersion),
    ("app-state-sync-key-", FileKind::AppStateSyncKey),
    ("sender-key-memory-", |_| FileKind::SenderKeyMemory),
    ("sender-key-", FileKind::SenderKey),
    ("identity-key-", FileKind::IdentityKey),
    ("lid-mapping-", FileKind::LidMapping),
    ("device-list-", |_| FileKind::DeviceList),
    ("pre-key-", FileKind::PreKey),
    ("session-", FileKind::Session),
    ("tctoken-", |_| FileKind::TcToken),
];

pub(super) fn kind_of(name: &str) -> FileKind {
    let Some(stem) = name.strip_suffix(".json") else { return FileKind::Unknown };
    if stem == "creds" {
        return FileKind::Creds;
    }
    for (prefix, make) in PREFIXES {
        if let Some(id) = stem.strip_prefix(prefix) {
            return make(id.to_owned());
        }
    }
    FileKind::Unknown
}
