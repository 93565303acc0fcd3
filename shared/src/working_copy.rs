//! The host's local working copy of one tenant's credential snapshot.
//!
//! The engine writes a record many times a minute and each write must be durable before the engine goes on
//! (a counter reservation is written before ciphertext leaves the host). Rewriting the whole snapshot for every
//! write would cost hundreds of kilobytes per message, so the working copy is a base file plus an append-only
//! journal of change batches:
//!
//! - `base.wkc`: the whole snapshot at one generation, every record sealed with the [`Cipher`]. Replaced only
//!   whole: written to a temp name, fsynced, renamed, and the directory fsynced.
//! - `journal.wkc`: change batches appended after that base, each length-prefixed and checksummed, fdatasynced
//!   before [`WorkingCopy::append`] returns. A crash can only tear the last entry; loading stops cleanly there.
//!
//! Hydration (a copy of a snapshot the credential store already holds durably) writes the journal and the base
//! without waiting for the disk, the journal's header marked unsynced ([`WorkingCopy::write_hydrated_base`]);
//! the first append makes both durable before it builds on them (whichever instance of the copy makes it). A
//! crash before that loses at most a copy the store still has: the files read back as missing, corrupt, or an
//! older copy the store is newer than, and are hydrated again.
//!
//! Loading is base + journal replay. When the journal grows past the base (and a floor), [`WorkingCopy::compact`]
//! folds it into a new base. The journal names the base it extends (a random base id): a journal left over from
//! an older base (a crash between replacing the base and resetting the journal) is ignored, because every new
//! base already contains, or deliberately replaces, what that journal held.
//!
//! Everything is under `<data_dir>/tenants/<tenant_id>/` (directory 0700, files 0600). Record keys are
//! encrypted along with values (they are phone numbers and contact addresses).
//!
//! This module also holds the whole-tenant export file ([`export_snapshot`], [`import_snapshot`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::crypto::{Cipher, SEAL_OVERHEAD};
use crate::domain::{
    CredentialSnapshot, MAX_RECORD_KEY_LEN, MAX_WRITES_PER_COMMIT, RecordChange, RecordKey, RecordKind, TenantId,
};

const BASE_FILE: &str = "base.wkc";
const JOURNAL_FILE: &str = "journal.wkc";
const TMP_SUFFIX: &str = ".tmp";

const BASE_MAGIC: &[u8; 8] = b"WKCBASE1";
const BASE_END: &[u8; 8] = b"WKCEND01";
const JOURNAL_MAGIC: &[u8; 8] = b"WKCJRNL1";
/// The journal header of a hydrated copy not yet made durable (see [`WorkingCopy::write_hydrated_base`]).
const JOURNAL_MAGIC_UNSYNCED: &[u8; 8] = b"WKCJRNLU";
/// magic, base id, generation, record count.
const BASE_HEADER_LEN: usize = 8 + 8 + 8 + 8;
/// trailer magic, crc32 of everything before the crc.
const BASE_TRAILER_LEN: usize = 8 + 4;
/// magic, base id, crc32 of both.
const JOURNAL_HEADER_LEN: usize = 8 + 8 + 4;
/// body length, crc32 of the body.
const ENTRY_HEADER_LEN: usize = 4 + 4;
/// generation, record count.
const ENTRY_BODY_MIN: usize = 8 + 4;

const OP_DELETE: u8 = 0;
const OP_PUT: u8 = 1;

/// Journal size below which compaction is never suggested.
pub const DEFAULT_COMPACT_FLOOR: u64 = 256 * 1024;

/// How much a batch of `changes` raises the generation: one per started [`MAX_WRITES_PER_COMMIT`], at least
/// one. The replicator may have to split a coalesced batch into several remote commits, and every remote commit
/// needs its own rising generation; this step guarantees the local generations leave room for them.
pub fn generation_step(changes: usize) -> u64 {
    changes.div_ceil(MAX_WRITES_PER_COMMIT).max(1) as u64
}

/// What went wrong with a working copy. Never carries record keys or values.
#[derive(Debug, thiserror::Error)]
pub enum WorkingCopyError {
    /// The file system failed; the working copy on disk is unchanged or still consistent.
    #[error("working copy i/o failed while {op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The files exist but cannot be used (bad checksum outside a torn tail, undecryptable record, unknown
    /// format). Definitive: hydrate again from the credential store.
    #[error("working copy is corrupt: {0}")]
    Corrupt(String),
    /// A change cannot be stored (e.g. a key longer than [`MAX_RECORD_KEY_LEN`]).
    #[error("invalid change: {0}")]
    Invalid(String),
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> WorkingCopyError {
    move |source| WorkingCopyError::Io { op, source }
}

/// Which file a record lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Segment {
    /// The base snapshot file.
    Base,
    /// The journal.
    Journal,
}

/// Where one sealed record frame lives on disk, so a reader can keep only this (12 bytes) in memory and load
/// the value on demand with [`RecordReader::read`]. Valid until the next [`WorkingCopy::write_base`] or
/// [`WorkingCopy::compact`], which move every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecordLoc {
    offset: u32,
    len: u32,
    segment: Segment,
}

impl RecordLoc {
    /// The file the record is in.
    pub fn segment(&self) -> Segment {
        self.segment
    }
}

/// One record met while scanning a working copy, in write order (base first, then journal entries).
#[derive(Debug)]
pub struct ScanItem {
    /// The record.
    pub key: RecordKey,
    /// The value written, or `None` for a deletion.
    pub value: Option<Vec<u8>>,
    /// Where the frame lives (for on-demand reloads of puts).
    pub loc: RecordLoc,
    /// The generation this record belongs to (the base's, or its journal entry's).
    pub generation: u64,
}

#[derive(Debug, Clone)]
struct BaseMeta {
    base_id: u64,
    generation: u64,
    len: u64,
}

#[derive(Debug, Clone)]
enum State {
    /// No base file: no local copy.
    Missing,
    /// The base (or a crc-valid journal entry's framing) is unusable.
    Corrupt(String),
    Present {
        base: BaseMeta,
        /// The journal extends this base: its entries are replayed. `false` when it is absent or left over
        /// from an older base; the next append starts a fresh one.
        journal_current: bool,
        /// Bytes of the journal that hold whole, valid entries (the header included).
        journal_len: u64,
        /// The newest generation (the last valid journal entry's, or the base's).
        generation: u64,
    },
}

/// Reads single records of a working copy by location, without the working copy itself (so readers need not
/// wait for a writer's fsync). Cheap to clone.
#[derive(Debug, Clone)]
pub struct RecordReader {
    dir: PathBuf,
    tenant: TenantId,
    cipher: Cipher,
    ad: Vec<u8>,
}

impl RecordReader {
    /// Reads the value of `key` at `loc`. `Ok(None)` when the frame there records a deletion. A frame that does
    /// not decrypt or holds another key (a location made stale by a compaction) is `Corrupt`.
    pub fn read(&self, loc: RecordLoc, key: &RecordKey) -> Result<Option<Vec<u8>>, WorkingCopyError> {
        use std::os::unix::fs::FileExt;
        let name = match loc.segment {
            Segment::Base => BASE_FILE,
            Segment::Journal => JOURNAL_FILE,
        };
        let file = File::open(self.dir.join(name)).map_err(io_err("opening a record's file"))?;
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, u64::from(loc.offset)).map_err(io_err("reading a record"))?;
        let (found, value) = open_frame(&self.cipher, &self.ad, &buf)?;
        if &found != key {
            return Err(WorkingCopyError::Corrupt("record location is stale".into()));
        }
        Ok(value)
    }

    /// The tenant this reader belongs to.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
}

/// One tenant's local working copy. Exactly one `WorkingCopy` may write a tenant's directory at a time (the
/// tenant lease guarantees one host; within the host the engine store owns it).
#[derive(Debug)]
pub struct WorkingCopy {
    dir: PathBuf,
    tenant: TenantId,
    cipher: Cipher,
    ad: Vec<u8>,
    state: State,
    torn_tail_bytes: u64,
    compact_floor: u64,
    /// The files were written by hydration without waiting for the disk (the journal header says so).
    unsynced: bool,
}

impl WorkingCopy {
    /// Opens the working copy of `tenant` under `<data_dir>/tenants/<tenant>/`. Creates nothing on disk; reads
    /// the file headers and walks the journal's checksums (no decryption) to learn the generation and the end
    /// of the last whole journal entry. A torn journal tail is noted (and cut off by the next append); a corrupt
    /// base is reported by [`WorkingCopy::load`], not here.
    pub fn open(data_dir: impl AsRef<Path>, tenant: TenantId, cipher: Cipher) -> Result<Self, WorkingCopyError> {
        let dir = tenant_dir(data_dir.as_ref(), &tenant);
        let ad = frame_ad(&tenant);
        let mut wc = Self {
            dir,
            tenant,
            cipher,
            ad,
            state: State::Missing,
            torn_tail_bytes: 0,
            compact_floor: DEFAULT_COMPACT_FLOOR,
            unsynced: false,
        };
        // A temp file is an unfinished replacement: the real file is still the consistent one.
        for name in [BASE_FILE, JOURNAL_FILE] {
            let _ = fs::remove_file(wc.dir.join(format!("{name}{TMP_SUFFIX}")));
        }
        wc.state = wc.inspect()?;
        wc.unsynced = journal_is_unsynced(&wc.dir)?;
        Ok(wc)
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The tenant's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a local copy exists (it may still turn out corrupt on [`WorkingCopy::load`]).
    pub fn exists(&self) -> bool {
        !matches!(self.state, State::Missing)
    }

    /// The newest local generation; `None` when there is no usable local copy.
    pub fn generation(&self) -> Option<u64> {
        match &self.state {
            State::Present { generation, .. } => Some(*generation),
            _ => None,
        }
    }

    /// Bytes cut off as a torn journal tail when the copy was opened (0 after a clean shutdown).
    pub fn torn_tail_bytes(&self) -> u64 {
        self.torn_tail_bytes
    }

    /// Size of the base file in bytes (0 without one).
    pub fn base_bytes(&self) -> u64 {
        match &self.state {
            State::Present { base, .. } => base.len,
            _ => 0,
        }
    }

    /// Size of the journal's valid entries in bytes (0 without a current journal).
    pub fn journal_bytes(&self) -> u64 {
        match &self.state {
            State::Present { journal_current: true, journal_len, .. } => *journal_len,
            _ => 0,
        }
    }

    /// Sets the journal size below which [`WorkingCopy::needs_compaction`] never says yes.
    pub fn set_compaction_floor(&mut self, bytes: u64) {
        self.compact_floor = bytes;
    }

    /// Whether the journal has grown enough (past the floor and past the base's size) that folding it into a
    /// new base pays off.
    pub fn needs_compaction(&self) -> bool {
        let journal = self.journal_bytes();
        journal > self.compact_floor && journal > self.base_bytes()
    }

    /// A reader for single records by location.
    pub fn reader(&self) -> RecordReader {
        RecordReader {
            dir: self.dir.clone(),
            tenant: self.tenant.clone(),
            cipher: self.cipher.clone(),
            ad: self.ad.clone(),
        }
    }

    /// The whole local snapshot: `Ok(None)` when there is no local copy, `Err(Corrupt)` when there is one that
    /// cannot be used.
    pub fn load(&self) -> Result<Option<CredentialSnapshot>, WorkingCopyError> {
        let mut snapshot = CredentialSnapshot::default();
        let generation = self.scan(|item| match item.value {
            Some(v) => {
                snapshot.records.insert(item.key, v);
            }
            None => {
                snapshot.records.remove(&item.key);
            }
        })?;
        Ok(generation.map(|g| {
            snapshot.generation = g;
            snapshot
        }))
    }

    /// Decrypts every record in write order (base, then each journal entry's changes) and hands it to `f`; the
    /// last item of a key is its current state. Returns the generation, or `None` when there is no local copy.
    pub fn scan(&self, mut f: impl FnMut(ScanItem)) -> Result<Option<u64>, WorkingCopyError> {
        let (base, journal_current, journal_len, generation) = match &self.state {
            State::Missing => return Ok(None),
            State::Corrupt(reason) => return Err(WorkingCopyError::Corrupt(reason.clone())),
            State::Present { base, journal_current, journal_len, generation } => {
                (base, *journal_current, *journal_len, *generation)
            }
        };
        let bytes = fs::read(self.dir.join(BASE_FILE)).map_err(io_err("reading the base"))?;
        let parsed = parse_base(&bytes)?;
        if parsed.base_id != base.base_id {
            return Err(WorkingCopyError::Corrupt("base file changed under the working copy".into()));
        }
        for (offset, len) in parsed.frames {
            let (key, value) = open_frame(&self.cipher, &self.ad, &bytes[offset..offset + len])?;
            if value.is_none() {
                return Err(WorkingCopyError::Corrupt("base holds a deletion".into()));
            }
            f(ScanItem { key, value, loc: loc(Segment::Base, offset, len)?, generation: base.generation });
        }
        drop(bytes);
        if journal_current {
            let bytes = fs::read(self.dir.join(JOURNAL_FILE)).map_err(io_err("reading the journal"))?;
            let end = (journal_len as usize).min(bytes.len());
            if end < journal_len as usize {
                return Err(WorkingCopyError::Corrupt("journal shrank under the working copy".into()));
            }
            let walk = walk_journal(&bytes[..end], base.generation);
            if walk.valid_len != end {
                return Err(WorkingCopyError::Corrupt("journal changed under the working copy".into()));
            }
            for entry in walk.entries {
                for (offset, len) in entry.frames {
                    let (key, value) = open_frame(&self.cipher, &self.ad, &bytes[offset..offset + len])?;
                    f(ScanItem { key, value, loc: loc(Segment::Journal, offset, len)?, generation: entry.generation });
                }
            }
        }
        Ok(Some(generation))
    }

    /// Whether the files were written by hydration and are not yet known to be durable.
    pub fn is_unsynced(&self) -> bool {
        self.unsynced
    }

    /// Replaces the local copy with `snapshot` (compaction, import, anything only this copy holds): the base is
    /// written to a temp name, fsynced, renamed and the directory fsynced; then a fresh journal is started the
    /// same way. A crash anywhere leaves either the old copy or the new one.
    pub fn write_base(&mut self, snapshot: &CredentialSnapshot) -> Result<(), WorkingCopyError> {
        self.write_base_with(snapshot, true)
    }

    /// Replaces the local copy with `snapshot` read from the credential store (hydration), without waiting for
    /// the disk. The store holds this generation durably, so losing the copy in a crash costs a hydration,
    /// never an acknowledged write. The journal, written first, is marked unsynced; the first
    /// [`WorkingCopy::append`] makes the files durable before it writes anything only this copy would hold.
    /// A restore of a thousand tenants waits for five fsyncs per tenant less this way; the first append pays
    /// three more, later and one tenant at a time.
    pub fn write_hydrated_base(&mut self, snapshot: &CredentialSnapshot) -> Result<(), WorkingCopyError> {
        self.write_base_with(snapshot, false)
    }

    fn write_base_with(&mut self, snapshot: &CredentialSnapshot, durable: bool) -> Result<(), WorkingCopyError> {
        self.ensure_dir(durable)?;
        let base_id = random_u64();
        let mut out = Vec::with_capacity(BASE_HEADER_LEN + BASE_TRAILER_LEN + snapshot.records.len() * 128);
        out.extend_from_slice(BASE_MAGIC);
        out.extend_from_slice(&base_id.to_le_bytes());
        out.extend_from_slice(&snapshot.generation.to_le_bytes());
        out.extend_from_slice(&(snapshot.records.len() as u64).to_le_bytes());
        let mut plain = Vec::new();
        for (key, value) in &snapshot.records {
            check_key(key)?;
            encode_frame_plain(&mut plain, key, Some(value));
            let sealed = self.cipher.seal_with_ad(&self.ad, &plain);
            out.extend_from_slice(&len_u32(sealed.len())?.to_le_bytes());
            out.extend_from_slice(&sealed);
        }
        out.extend_from_slice(BASE_END);
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        if out.len() > u32::MAX as usize {
            return Err(WorkingCopyError::Invalid("snapshot too large for one base file".into()));
        }
        if durable {
            self.replace_file(BASE_FILE, &out, true)?;
            // The new base is live from here; the old journal no longer matches its id and is ignored.
            self.reset_journal(base_id, true)?;
            if self.unsynced {
                // Replacing a hydrated copy: the files and their directory are durable now, its entry may not be.
                self.make_durable()?;
            }
        } else {
            // The unsynced journal first: whatever else of the new copy is on disk, it says so.
            self.reset_journal(base_id, false)?;
            self.unsynced = true;
            self.replace_file(BASE_FILE, &out, false)?;
        }
        self.state = State::Present {
            base: BaseMeta { base_id, generation: snapshot.generation, len: out.len() as u64 },
            journal_current: true,
            journal_len: JOURNAL_HEADER_LEN as u64,
            generation: snapshot.generation,
        };
        self.torn_tail_bytes = 0;
        debug!(tenant = %self.tenant, generation = snapshot.generation, records = snapshot.records.len(), "working copy base written");
        Ok(())
    }

    /// Appends one batch of changes durably (fdatasync) and returns the new generation, raised by
    /// [`generation_step`]. An empty batch writes nothing. Starts an empty base (generation 0) when there is no
    /// local copy yet, so a freshly paired device needs no special case.
    pub fn append(&mut self, changes: &[RecordChange]) -> Result<u64, WorkingCopyError> {
        self.append_located(changes).map(|(generation, _)| generation)
    }

    /// [`WorkingCopy::append`], also returning where each change's frame landed (in the order of `changes`).
    pub fn append_located(&mut self, changes: &[RecordChange]) -> Result<(u64, Vec<RecordLoc>), WorkingCopyError> {
        for c in changes {
            check_key(&c.key)?;
        }
        if let State::Corrupt(reason) = &self.state {
            return Err(WorkingCopyError::Corrupt(reason.clone()));
        }
        if matches!(self.state, State::Missing) {
            self.write_base(&CredentialSnapshot::default())?;
        }
        let State::Present { base, journal_current, generation, .. } = &self.state else {
            unreachable!("a base exists here");
        };
        if changes.is_empty() {
            return Ok((*generation, Vec::new()));
        }
        let (base_id, base_generation, journal_current) = (base.base_id, base.generation, *journal_current);
        if self.unsynced {
            // The entry below exists only here once acknowledged: the hydrated files it builds on go first.
            self.make_durable()?;
        }
        if !journal_current {
            self.reset_journal(base_id, true)?;
            if let State::Present { journal_current, journal_len, generation, .. } = &mut self.state {
                *journal_current = true;
                *journal_len = JOURNAL_HEADER_LEN as u64;
                *generation = base_generation;
            }
        }
        let State::Present { journal_len, generation, .. } = &self.state else { unreachable!() };
        let (start, prev) = (*journal_len, *generation);
        let new_generation = prev + generation_step(changes.len());

        let mut body = Vec::with_capacity(ENTRY_BODY_MIN + changes.len() * 96);
        body.extend_from_slice(&new_generation.to_le_bytes());
        body.extend_from_slice(&len_u32(changes.len())?.to_le_bytes());
        let mut frames = Vec::with_capacity(changes.len());
        let mut plain = Vec::new();
        for c in changes {
            encode_frame_plain(&mut plain, &c.key, c.value.as_deref());
            let sealed = self.cipher.seal_with_ad(&self.ad, &plain);
            body.extend_from_slice(&len_u32(sealed.len())?.to_le_bytes());
            frames.push((start as usize + ENTRY_HEADER_LEN + body.len(), sealed.len()));
            body.extend_from_slice(&sealed);
        }
        let mut entry = Vec::with_capacity(ENTRY_HEADER_LEN + body.len());
        entry.extend_from_slice(&len_u32(body.len())?.to_le_bytes());
        entry.extend_from_slice(&crc32(&body).to_le_bytes());
        entry.extend_from_slice(&body);
        let end = start + entry.len() as u64;
        if end > u64::from(u32::MAX) {
            return Err(WorkingCopyError::Invalid("journal would exceed 4 GiB; compact first".into()));
        }

        let file =
            OpenOptions::new().write(true).open(self.dir.join(JOURNAL_FILE)).map_err(io_err("opening the journal"))?;
        // A torn tail (or a failed earlier append) left bytes past the last whole entry: cut them off, or the
        // new entry would sit behind garbage that replay stops at.
        let on_disk = file.metadata().map_err(io_err("inspecting the journal"))?.len();
        if on_disk != start {
            file.set_len(start).map_err(io_err("truncating the journal's torn tail"))?;
        }
        {
            use std::os::unix::fs::FileExt;
            file.write_all_at(&entry, start).map_err(io_err("appending to the journal"))?;
        }
        file.sync_data().map_err(io_err("syncing the journal"))?;
        if let State::Present { journal_len, generation, .. } = &mut self.state {
            *journal_len = end;
            *generation = new_generation;
        }
        let locs = frames.into_iter().map(|(o, l)| loc(Segment::Journal, o, l)).collect::<Result<Vec<_>, _>>()?;
        Ok((new_generation, locs))
    }

    /// Folds the journal into a new base (same generation). Record locations handed out before are stale after.
    pub fn compact(&mut self) -> Result<(), WorkingCopyError> {
        let Some(snapshot) = self.load()? else { return Ok(()) };
        self.write_base(&snapshot)?;
        debug!(tenant = %self.tenant, generation = snapshot.generation, "working copy compacted");
        Ok(())
    }

    /// Removes the local copy (logout, a tenant moved away, a copy fenced off by another host).
    pub fn delete(&mut self) -> Result<(), WorkingCopyError> {
        let existed = match fs::remove_dir_all(&self.dir) {
            Ok(()) => true,
            // Nothing to delete (on a fresh data dir not even the parent exists): nothing to make durable.
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(WorkingCopyError::Io { op: "deleting the working copy", source: e }),
        };
        if existed && let Some(parent) = self.dir.parent() {
            sync_dir(parent)?;
        }
        self.state = State::Missing;
        self.torn_tail_bytes = 0;
        self.unsynced = false;
        Ok(())
    }

    /// Makes a hydrated copy durable: the base, the directory and the directory's own entry; then the journal
    /// header loses its unsynced mark (made durable by the append that follows; a mark that comes back after a
    /// crash costs these fsyncs once more).
    fn make_durable(&mut self) -> Result<(), WorkingCopyError> {
        match File::open(self.dir.join(BASE_FILE)) {
            Ok(f) => f.sync_all().map_err(io_err("syncing a hydrated base"))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(WorkingCopyError::Io { op: "opening a hydrated base", source: e }),
        }
        sync_dir(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            sync_dir(parent)?;
        }
        match OpenOptions::new().read(true).write(true).open(self.dir.join(JOURNAL_FILE)) {
            Ok(f) => {
                use std::os::unix::fs::FileExt;
                let mut head = [0u8; JOURNAL_HEADER_LEN];
                let read = match f.read_exact_at(&mut head, 0) {
                    Ok(()) => true,
                    // A torn header: the journal matches no base and is started afresh by the append.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
                    Err(e) => return Err(WorkingCopyError::Io { op: "reading the journal header", source: e }),
                };
                if read && &head[..8] == JOURNAL_MAGIC_UNSYNCED {
                    // The same header with the plain magic and its checksum (which covers the magic).
                    head[..8].copy_from_slice(JOURNAL_MAGIC);
                    let crc = crc32(&head[..16]);
                    head[16..].copy_from_slice(&crc.to_le_bytes());
                    f.write_all_at(&head, 0).map_err(io_err("marking the journal synced"))?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(WorkingCopyError::Io { op: "opening the journal", source: e }),
        }
        self.unsynced = false;
        Ok(())
    }

    fn ensure_dir(&self, durable: bool) -> Result<(), WorkingCopyError> {
        if self.dir.is_dir() {
            return Ok(());
        }
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true);
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(&self.dir).map_err(io_err("creating the tenant directory"))?;
        // `mode` is masked by the umask; make sure the directory really is private.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("restricting the tenant directory"))?;
        if let Some(parent) = self.dir.parent().filter(|_| durable) {
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// Writes `bytes` to `name` atomically: temp file, fsync, rename, directory fsync (the fsyncs only when
    /// `durable`; the rename alone still replaces the file whole for every reader until a crash).
    fn replace_file(&self, name: &str, bytes: &[u8], durable: bool) -> Result<(), WorkingCopyError> {
        let tmp = self.dir.join(format!("{name}{TMP_SUFFIX}"));
        let mut opts = OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut file = opts.open(&tmp).map_err(io_err("creating a temp file"))?;
        file.write_all(bytes).map_err(io_err("writing a temp file"))?;
        if durable {
            file.sync_all().map_err(io_err("syncing a temp file"))?;
        }
        drop(file);
        fs::rename(&tmp, self.dir.join(name)).map_err(io_err("renaming a temp file"))?;
        if durable { sync_dir(&self.dir) } else { Ok(()) }
    }

    /// Starts an empty journal extending base `base_id`; marked unsynced when not `durable`.
    fn reset_journal(&self, base_id: u64, durable: bool) -> Result<(), WorkingCopyError> {
        let mut header = Vec::with_capacity(JOURNAL_HEADER_LEN);
        header.extend_from_slice(if durable { JOURNAL_MAGIC } else { JOURNAL_MAGIC_UNSYNCED });
        header.extend_from_slice(&base_id.to_le_bytes());
        let crc = crc32(&header);
        header.extend_from_slice(&crc.to_le_bytes());
        self.replace_file(JOURNAL_FILE, &header, durable)
    }

    /// Reads the headers and checksums to learn the state of the files on disk.
    fn inspect(&mut self) -> Result<State, WorkingCopyError> {
        let bytes = match fs::read(self.dir.join(BASE_FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::Missing),
            Err(e) => return Err(WorkingCopyError::Io { op: "reading the base", source: e }),
        };
        let base = match parse_base(&bytes) {
            Ok(p) => BaseMeta { base_id: p.base_id, generation: p.generation, len: bytes.len() as u64 },
            Err(WorkingCopyError::Corrupt(reason)) => {
                warn!(tenant = %self.tenant, %reason, "working copy base is corrupt");
                return Ok(State::Corrupt(reason));
            }
            Err(e) => return Err(e),
        };
        drop(bytes);
        let journal = match fs::read(self.dir.join(JOURNAL_FILE)) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(WorkingCopyError::Io { op: "reading the journal", source: e }),
        };
        let Some(journal) = journal else {
            return Ok(State::Present { generation: base.generation, base, journal_current: false, journal_len: 0 });
        };
        if journal_base_id(&journal) != Some(base.base_id) {
            // Left over from an older base (or its header was torn while being replaced): the base has it all.
            return Ok(State::Present { generation: base.generation, base, journal_current: false, journal_len: 0 });
        }
        let walk = walk_journal(&journal, base.generation);
        self.torn_tail_bytes = (journal.len() - walk.valid_len) as u64;
        if self.torn_tail_bytes > 0 {
            warn!(tenant = %self.tenant, bytes = self.torn_tail_bytes, "working copy journal has a torn tail; replay stops before it");
        }
        let generation = walk.entries.last().map_or(base.generation, |e| e.generation);
        Ok(State::Present { base, journal_current: true, journal_len: walk.valid_len as u64, generation })
    }
}

/// `<data_dir>/tenants/<tenant>`.
pub fn tenant_dir(data_dir: &Path, tenant: &TenantId) -> PathBuf {
    data_dir.join("tenants").join(tenant.as_str())
}

fn frame_ad(tenant: &TenantId) -> Vec<u8> {
    let mut ad = b"wakeeper/working-copy/v1\0".to_vec();
    ad.extend_from_slice(tenant.as_str().as_bytes());
    ad
}

fn check_key(key: &RecordKey) -> Result<(), WorkingCopyError> {
    if key.key.len() > MAX_RECORD_KEY_LEN {
        return Err(WorkingCopyError::Invalid(format!(
            "a {} key is longer than {MAX_RECORD_KEY_LEN} bytes",
            key.kind.as_str()
        )));
    }
    Ok(())
}

fn len_u32(n: usize) -> Result<u32, WorkingCopyError> {
    u32::try_from(n).map_err(|_| WorkingCopyError::Invalid("record too large".into()))
}

fn loc(segment: Segment, offset: usize, len: usize) -> Result<RecordLoc, WorkingCopyError> {
    Ok(RecordLoc {
        offset: u32::try_from(offset).map_err(|_| WorkingCopyError::Corrupt("file larger than 4 GiB".into()))?,
        len: len_u32(len)?,
        segment,
    })
}

/// Plaintext of a record frame: kind name, key, op, value.
fn encode_frame_plain(out: &mut Vec<u8>, key: &RecordKey, value: Option<&[u8]>) {
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

fn open_frame(cipher: &Cipher, ad: &[u8], sealed: &[u8]) -> Result<(RecordKey, Option<Vec<u8>>), WorkingCopyError> {
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

struct ParsedBase {
    base_id: u64,
    generation: u64,
    /// (offset, len) of each sealed frame.
    frames: Vec<(usize, usize)>,
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

fn parse_base(bytes: &[u8]) -> Result<ParsedBase, WorkingCopyError> {
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

fn journal_base_id(bytes: &[u8]) -> Option<u64> {
    if bytes.len() < JOURNAL_HEADER_LEN || (&bytes[..8] != JOURNAL_MAGIC && &bytes[..8] != JOURNAL_MAGIC_UNSYNCED) {
        return None;
    }
    let crc = read_u32(bytes, 16)?;
    (crc == crc32(&bytes[..16])).then(|| read_u64(bytes, 8)).flatten()
}

/// Whether the tenant's journal carries the unsynced mark of a hydration not yet made durable. Any journal
/// with the mark counts, even one naming another base: hydration writes the journal before the base.
fn journal_is_unsynced(dir: &Path) -> Result<bool, WorkingCopyError> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    match File::open(dir.join(JOURNAL_FILE)).and_then(|mut f| f.read_exact(&mut magic)) {
        Ok(()) => Ok(&magic == JOURNAL_MAGIC_UNSYNCED),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof) => Ok(false),
        Err(e) => Err(WorkingCopyError::Io { op: "reading the journal header", source: e }),
    }
}

struct JournalEntry {
    generation: u64,
    frames: Vec<(usize, usize)>,
}

struct JournalWalk {
    entries: Vec<JournalEntry>,
    /// End of the last whole, valid entry.
    valid_len: usize,
}

/// Walks the journal's entries, stopping at the first that is incomplete, fails its checksum, or does not raise
/// the generation: under fdatasync-per-append only the last entry can be torn by a crash.
fn walk_journal(bytes: &[u8], base_generation: u64) -> JournalWalk {
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

fn sync_dir(dir: &Path) -> Result<(), WorkingCopyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing a directory"))
}

fn random_u64() -> u64 {
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
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

// ---------------------------------------------------------------------------------------------------------------
// Whole-tenant export file
// ---------------------------------------------------------------------------------------------------------------

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_ieee_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn generation_step_leaves_room_for_split_commits() {
        assert_eq!(generation_step(0), 1);
        assert_eq!(generation_step(1), 1);
        assert_eq!(generation_step(500), 1);
        assert_eq!(generation_step(501), 2);
        assert_eq!(generation_step(1200), 3);
    }
}
