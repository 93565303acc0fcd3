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
//! - `epoch`: the lease epoch the copy's writes are made under, in decimal; written durably before the first
//!   append under a new epoch ([`WorkingCopy::continue_under`]). A copy whose epoch is older than the store's
//!   last writer's is a fenced-off owner's and is never pushed up, whatever its generation.
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

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::crypto::Cipher;
use crate::domain::{CredentialSnapshot, MAX_WRITES_PER_COMMIT, RecordChange, TenantId};
use crate::private_files::{PrivateFileError, refuse_symlink};

use super::frames::*;
use super::records::{RecordLoc, RecordReader, ScanItem, Segment};

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
    /// The tenant's directory or one of its files is a symlink: never followed, nothing read or written.
    #[error("working copy refused: {0}")]
    Refused(#[from] PrivateFileError),
}

pub(super) fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> WorkingCopyError {
    move |source| WorkingCopyError::Io { op, source }
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
    /// The epoch on disk (`None`: no file, or one that does not parse).
    epoch: Option<u64>,
    /// The epoch the next append writes under, when it differs from the one on disk.
    epoch_pending: Option<u64>,
    /// Where a reported disk fault is recorded (`None`: nowhere).
    disk: Option<crate::disk::DiskWatch>,
    /// Tests: the file-system step that fails next, as a full disk would.
    #[cfg(test)]
    fail_at: Option<(&'static str, Step)>,
}

/// The steps of writing a file, named so tests can fail each one as a full disk would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Write,
    Sync,
    Rename,
    SyncDir,
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
            epoch: None,
            epoch_pending: None,
            disk: None,
            #[cfg(test)]
            fail_at: None,
        };
        // Nothing is read or written through a symlink, inside the data dir or out of it.
        refuse_symlink(&wc.dir)?;
        for name in [BASE_FILE, JOURNAL_FILE, EPOCH_FILE] {
            refuse_symlink(&wc.dir.join(name))?;
        }
        // A temp file is an unfinished replacement: the real file is still the consistent one.
        for name in [BASE_FILE, JOURNAL_FILE, EPOCH_FILE] {
            let _ = fs::remove_file(wc.dir.join(format!("{name}{TMP_SUFFIX}")));
        }
        wc.state = wc.inspect()?;
        wc.unsynced = journal_is_unsynced(&wc.dir)?;
        wc.epoch = read_epoch(&wc.dir, &wc.tenant)?;
        Ok(wc)
    }

    /// The lease epoch the copy's writes were last made under; `None` when unknown (a copy written before
    /// epochs were recorded, or none at all).
    pub fn epoch(&self) -> Option<u64> {
        self.epoch_pending.or(self.epoch)
    }

    /// Makes every later append count as written under `epoch`: recorded durably before the first of them.
    pub fn continue_under(&mut self, epoch: u64) {
        self.epoch_pending = (self.epoch != Some(epoch)).then_some(epoch);
    }

    /// Reports every I/O failure of a write to `disk` (under the `tenants` directory), so a full disk is
    /// seen as the host's condition and not only as one tenant's failed write.
    pub fn report_to(&mut self, disk: crate::disk::DiskWatch) {
        self.disk = Some(disk);
    }

    /// Hands a write's error to the disk watch (when there is one) and returns it.
    fn reported<T>(&self, result: Result<T, WorkingCopyError>) -> Result<T, WorkingCopyError> {
        if let (Err(WorkingCopyError::Io { op, source }), Some(disk)) = (&result, &self.disk) {
            let path = self.dir.parent().unwrap_or(&self.dir);
            disk.report_io(path, op, source);
            disk.note_refused_writer(self.tenant.as_str());
        }
        result
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
        let result = self.write_base_unreported(snapshot, durable);
        self.reported(result)
    }

    fn write_base_unreported(&mut self, snapshot: &CredentialSnapshot, durable: bool) -> Result<(), WorkingCopyError> {
        self.ensure_dir(durable)?;
        let base_id = random_u64();
        let mut out = Vec::with_capacity(BASE_HEADER_LEN + BASE_TRAILER_LEN + snapshot.records.len() * 128);
        out.extend_from_slice(BASE_MAGIC);
        out.extend_from_slice(&base_id.to_le_bytes());
        out.extend_from_slice(&snapshot.generation.to_le_bytes());
        out.extend_from_slice(&(snapshot.records.len() as u64).to_le_bytes());
        let mut plain = Vec::new();
        for (key, value) in &snapshot.records {
            check_record(key, Some(value))?;
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
        let base = BaseMeta { base_id, generation: snapshot.generation, len: out.len() as u64 };
        let generation = snapshot.generation;
        // The whole base goes to its temp name first (the large write, the one a full disk refuses): until the
        // rename below nothing the copy reads has changed.
        let tmp = self.write_temp(BASE_FILE, &out, durable)?;
        if durable {
            self.rename_into_place(&tmp, BASE_FILE)?;
            // The new base is live from here and the old journal, naming the old base, is ignored: anything
            // appended to it now would be lost on the next load. Until a fresh journal names the new base the
            // copy has none, and the next append starts one before it writes (should a step below fail).
            self.state = State::Present { base, journal_current: false, journal_len: 0, generation };
            self.torn_tail_bytes = 0;
            self.sync_dir_step(BASE_FILE)?;
            self.reset_journal(base_id, true)?;
            self.journal_started();
            if self.unsynced {
                // Replacing a hydrated copy: the files and their directory are durable now, its entry may not be.
                self.make_durable()?;
            }
        } else {
            // The unsynced journal before the base: whatever else of the new copy is on disk, it says so.
            if let Err(e) = self.reset_journal(base_id, false) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            self.unsynced = true;
            if let Err(e) = self.rename_into_place(&tmp, BASE_FILE) {
                // The old base has lost its journal to the new one: neither copy is whole. Nothing may build on
                // it; the copy is hydrated again.
                self.state = State::Corrupt("a hydration was cut short; hydrate again".into());
                return Err(e);
            }
            self.state =
                State::Present { base, journal_current: true, journal_len: JOURNAL_HEADER_LEN as u64, generation };
            self.torn_tail_bytes = 0;
        }
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
        let result = self.append_unreported(changes);
        self.reported(result)
    }

    fn append_unreported(&mut self, changes: &[RecordChange]) -> Result<(u64, Vec<RecordLoc>), WorkingCopyError> {
        for c in changes {
            check_record(&c.key, c.value.as_deref())?;
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
        if let Some(epoch) = self.epoch_pending {
            // Before anything is written under the new epoch, the copy says whose it is.
            self.replace_file(EPOCH_FILE, format!("{epoch}\n").as_bytes(), true)?;
            self.epoch = Some(epoch);
            self.epoch_pending = None;
        }
        if !journal_current {
            self.reset_journal(base_id, true)?;
            self.journal_started();
            debug_assert_eq!(self.generation(), Some(base_generation));
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

        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.dir.join(JOURNAL_FILE))
            .map_err(io_err("opening the journal"))?;
        // A torn tail (or a failed earlier append) left bytes past the last whole entry: cut them off, or the
        // new entry would sit behind garbage that replay stops at.
        let on_disk = file.metadata().map_err(io_err("inspecting the journal"))?.len();
        if on_disk != start {
            file.set_len(start).map_err(io_err("truncating the journal's torn tail"))?;
        }
        {
            use std::os::unix::fs::FileExt;
            self.step(JOURNAL_FILE, Step::Write)?;
            file.write_all_at(&entry, start).map_err(io_err("appending to the journal"))?;
        }
        self.step(JOURNAL_FILE, Step::Sync)?;
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
        self.epoch = None;
        self.epoch_pending = None;
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
        match OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(self.dir.join(JOURNAL_FILE))
        {
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
        let existed = self.dir.is_dir();
        crate::private_files::private_dir(&self.dir)?;
        if let Some(parent) = self.dir.parent().filter(|_| durable && !existed) {
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// Writes `bytes` to `name` atomically: temp file, fsync, rename, directory fsync (the fsyncs only when
    /// `durable`; the rename alone still replaces the file whole for every reader until a crash).
    fn replace_file(&self, name: &'static str, bytes: &[u8], durable: bool) -> Result<(), WorkingCopyError> {
        let tmp = self.write_temp(name, bytes, durable)?;
        self.rename_into_place(&tmp, name)?;
        if durable { self.sync_dir_step(name) } else { Ok(()) }
    }

    /// Writes `bytes` to `name`'s temp file (fsynced when `durable`); a failure removes what it wrote, so a
    /// full disk is not kept full by a half-written temp file.
    fn write_temp(&self, name: &'static str, bytes: &[u8], durable: bool) -> Result<PathBuf, WorkingCopyError> {
        let tmp = self.dir.join(format!("{name}{TMP_SUFFIX}"));
        let written = (|| {
            let mut opts = OpenOptions::new();
            opts.write(true).create(true).truncate(true).custom_flags(libc::O_NOFOLLOW);
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut file = opts.open(&tmp).map_err(io_err("creating a temp file"))?;
            self.step(name, Step::Write)?;
            file.write_all(bytes).map_err(io_err("writing a temp file"))?;
            if durable {
                self.step(name, Step::Sync)?;
                file.sync_all().map_err(io_err("syncing a temp file"))?;
            }
            Ok(())
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map(|()| tmp)
    }

    /// Renames a written temp file over `name`: the one step after which readers see the new file.
    fn rename_into_place(&self, tmp: &Path, name: &'static str) -> Result<(), WorkingCopyError> {
        let renamed = self
            .step(name, Step::Rename)
            .and_then(|()| fs::rename(tmp, self.dir.join(name)).map_err(io_err("renaming a temp file")));
        if renamed.is_err() {
            let _ = fs::remove_file(tmp);
        }
        renamed
    }

    /// Makes the renames in the tenant's directory durable.
    fn sync_dir_step(&self, name: &'static str) -> Result<(), WorkingCopyError> {
        self.step(name, Step::SyncDir)?;
        sync_dir(&self.dir)
    }

    /// The journal on disk is a fresh, empty one naming the current base.
    fn journal_started(&mut self) {
        if let State::Present { base, journal_current, journal_len, generation } = &mut self.state {
            *journal_current = true;
            *journal_len = JOURNAL_HEADER_LEN as u64;
            *generation = base.generation;
        }
    }

    /// Tests: fails the step `fail_at` names (once), as a full disk would.
    #[cfg(test)]
    fn step(&self, name: &'static str, step: Step) -> Result<(), WorkingCopyError> {
        if self.fail_at == Some((name, step)) {
            return Err(WorkingCopyError::Io {
                op: "an injected fault",
                source: io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn step(&self, _name: &'static str, _step: Step) -> Result<(), WorkingCopyError> {
        Ok(())
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

/// The epoch file's value; a file that does not parse counts as unknown (and is replaced by the next append).
fn read_epoch(dir: &Path, tenant: &TenantId) -> Result<Option<u64>, WorkingCopyError> {
    match fs::read(dir.join(EPOCH_FILE)) {
        Ok(bytes) => {
            let parsed = std::str::from_utf8(&bytes).ok().and_then(|s| s.trim().parse().ok());
            if parsed.is_none() {
                warn!(%tenant, "the working copy's epoch file does not parse; treating its epoch as unknown");
            }
            Ok(parsed)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(WorkingCopyError::Io { op: "reading the epoch file", source: e }),
    }
}

/// `<data_dir>/tenants/<tenant>`.
pub fn tenant_dir(data_dir: &Path, tenant: &TenantId) -> PathBuf {
    data_dir.join("tenants").join(tenant.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_step_leaves_room_for_split_commits() {
        assert_eq!(generation_step(0), 1);
        assert_eq!(generation_step(1), 1);
        assert_eq!(generation_step(500), 1);
        assert_eq!(generation_step(501), 2);
        assert_eq!(generation_step(1200), 3);
    }

    use crate::domain::{RecordKey, RecordKind};

    fn put(key: &str, value: u8) -> RecordChange {
        RecordChange { key: RecordKey::new(RecordKind::Session, key), value: Some(vec![value; 64]) }
    }

    fn copy(dir: &Path) -> WorkingCopy {
        WorkingCopy::open(dir, TenantId::parse("t-1").unwrap(), Cipher::new(&[9; 32])).unwrap()
    }

    const EVERY_STEP: [(&str, Step); 8] = [
        (BASE_FILE, Step::Write),
        (BASE_FILE, Step::Sync),
        (BASE_FILE, Step::Rename),
        (BASE_FILE, Step::SyncDir),
        (JOURNAL_FILE, Step::Write),
        (JOURNAL_FILE, Step::Sync),
        (JOURNAL_FILE, Step::Rename),
        (JOURNAL_FILE, Step::SyncDir),
    ];

    /// A compaction cut short by a full disk at any step (before the new base is live, between it and the
    /// fresh journal, after both) loses none of the appends acknowledged before it or after it: the journal is
    /// never one the base on disk ignores. On the code before this test, a failed journal reset left later
    /// appends in the old journal, which names the old base, and a reload dropped them.
    #[test]
    fn a_compaction_cut_short_at_any_step_loses_no_acknowledged_append() {
        for (file, step) in EVERY_STEP {
            let dir = tempfile::tempdir().unwrap();
            let mut wc = copy(dir.path());
            wc.append(&[put("a", 1)]).unwrap();
            wc.append(&[put("b", 2)]).unwrap();
            wc.fail_at = Some((file, step));
            let err = wc.compact().expect_err("the injected fault fails the compaction");
            assert!(matches!(err, WorkingCopyError::Io { .. }), "{file} {step:?}: {err}");
            wc.fail_at = None;
            let generation = wc.append(&[put("c", 3)]).unwrap();
            wc.append(&[put("a", 4)]).unwrap();
            drop(wc);

            let reopened = copy(dir.path());
            let snapshot = reopened.load().unwrap().expect("a copy");
            let value = |k: &str| snapshot.records.get(&RecordKey::new(RecordKind::Session, k)).map(|v| v[0]);
            assert_eq!(
                (value("a"), value("b"), value("c")),
                (Some(4), Some(2), Some(3)),
                "after a fault at {file} {step:?}"
            );
            assert_eq!(snapshot.generation, generation + 1, "after a fault at {file} {step:?}");
            assert!(
                std::fs::read_dir(dir.path().join("tenants/t-1")).unwrap().all(|e| !e
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(TMP_SUFFIX)),
                "no temp file is left to keep the disk full ({file} {step:?})"
            );
        }
    }

    /// A failed append acknowledges nothing and leaves nothing behind that a later append would sit behind.
    #[test]
    fn a_failed_append_is_not_kept_and_the_next_one_lands() {
        for step in [Step::Write, Step::Sync] {
            let dir = tempfile::tempdir().unwrap();
            let mut wc = copy(dir.path());
            wc.append(&[put("a", 1)]).unwrap();
            wc.fail_at = Some((JOURNAL_FILE, step));
            wc.append(&[put("lost", 2)]).expect_err("refused");
            wc.fail_at = None;
            wc.append(&[put("b", 3)]).unwrap();
            drop(wc);
            let snapshot = copy(dir.path()).load().unwrap().unwrap();
            let keys: Vec<_> = snapshot.records.keys().map(|k| k.key.as_str()).collect();
            assert_eq!(keys, ["a", "b"], "after a fault at {step:?}");
        }
    }

    /// A hydration cut short never leaves a copy later appends build on: it reads as the old copy whole, or
    /// the copy refuses appends until it is hydrated again.
    #[test]
    fn a_hydration_cut_short_leaves_the_old_copy_or_refuses_appends() {
        for (file, step) in EVERY_STEP {
            let dir = tempfile::tempdir().unwrap();
            let mut wc = copy(dir.path());
            wc.append(&[put("old", 1)]).unwrap();
            let mut fresh = CredentialSnapshot { generation: 50, ..Default::default() };
            fresh.records.insert(RecordKey::new(RecordKind::Session, "new"), vec![5; 64]);
            wc.fail_at = Some((file, step));
            let failed = wc.write_hydrated_base(&fresh).is_err();
            wc.fail_at = None;
            if !failed {
                // This step is not taken by a hydration (no fsyncs): the copy is the new one.
                assert_eq!(wc.load().unwrap().unwrap().generation, 50);
                continue;
            }
            match wc.append(&[put("after", 2)]) {
                Ok(_) => {
                    let snapshot = copy(dir.path()).load().unwrap().unwrap();
                    let keys: Vec<_> = snapshot.records.keys().map(|k| k.key.as_str()).collect();
                    assert_eq!(keys, ["after", "old"], "after a fault at {file} {step:?}");
                }
                Err(e) => assert!(matches!(e, WorkingCopyError::Corrupt(_)), "{file} {step:?}: {e}"),
            }
        }
    }

    /// An I/O failure of a write is reported to the disk watch under the tenants directory.
    #[test]
    fn write_failures_are_reported_to_the_disk_watch() {
        let dir = tempfile::tempdir().unwrap();
        let watch = crate::disk::DiskWatch::new();
        let mut wc = copy(dir.path());
        wc.report_to(watch.clone());
        wc.append(&[put("a", 1)]).unwrap();
        assert_eq!(watch.fault(), None);
        wc.fail_at = Some((JOURNAL_FILE, Step::Write));
        wc.append(&[put("b", 2)]).unwrap_err();
        let faults = watch.faults();
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0].path, dir.path().join("tenants"));
        assert_eq!(faults[0].kind, crate::disk::FaultKind::Full);
    }
}
