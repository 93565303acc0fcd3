//! Local disk faults: a full disk (or any failing write) is an outage the host reports and recovers from by
//! itself, never a loss.
//!
//! - [`classify`]: `ENOSPC` and `EDQUOT` are [`FaultKind::Full`], every other I/O error
//!   [`FaultKind::Unavailable`].
//! - [`free_bytes`] (statvfs) and [`probe`] (a small fsynced write, then removed): what the host checks while
//!   a fault lasts, to learn when space has returned.
//! - [`DiskWatch`]: the host's shared record of which paths are faulted, since when and why. Every writer
//!   (the embedded store, the outbox, the working copies) reports to it; the host's readiness, its refusals
//!   of new work and its recovery task read it. A path stays faulted until a probe beside it succeeds and the
//!   path's [`Recover`] (if one is registered) has made it usable again.
//! - [`RedbFile`] (feature `embedded`): a redb database that can be reopened in place. After one failed write
//!   redb answers `PreviousIo` to every later call until the database is closed; reopening it (its own repair
//!   runs then) is what lets the host carry on when space returns, with no restart.
//!
//! SQLite and PostgreSQL are the anchors: refuse the write that cannot be made durable, keep everything
//! committed, carry on when the space returns.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::domain::{UnixMillis, now_millis};

/// Bytes [`probe`] writes: a page, so a disk with room for nothing refuses it.
pub const PROBE_BYTES: usize = 4096;
/// The probe's file name, in the directory probed.
pub const PROBE_FILE: &str = ".wakeeper-disk-probe";
/// Free space below which a failing store is taken to have failed for lack of space (its own error, seen
/// through the store's error type, no longer says).
pub const LOW_SPACE_BYTES: u64 = 256 * 1024;

/// What kind of disk fault a failed write shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// Any other I/O error: a read-only remount, a failing device, a lost network volume.
    Unavailable,
    /// No space left (`ENOSPC`), or the user's quota is used up (`EDQUOT`).
    Full,
}

impl FaultKind {
    /// `full` or `unavailable`: metric label and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Full => "full",
            FaultKind::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of fault an I/O error shows.
pub fn classify(e: &io::Error) -> FaultKind {
    match e.raw_os_error() {
        Some(code) if code == libc::ENOSPC || code == libc::EDQUOT => FaultKind::Full,
        _ if e.kind() == io::ErrorKind::StorageFull || e.kind() == io::ErrorKind::QuotaExceeded => FaultKind::Full,
        _ => FaultKind::Unavailable,
    }
}

/// Bytes an unprivileged writer may still use on the file system holding `path` (or its nearest existing
/// ancestor, so a path not created yet still answers).
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let mut at = path;
    loop {
        match rustix::fs::statvfs(at) {
            Ok(st) => return Ok(st.f_bavail.saturating_mul(st.f_frsize)),
            Err(rustix::io::Errno::NOENT) => match at.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) => at = parent,
                None => return Err(io::Error::from(rustix::io::Errno::NOENT)),
            },
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Whether `dir` takes a write now: [`PROBE_BYTES`] to [`PROBE_FILE`], fsynced, then removed. Blocking.
pub fn probe(dir: &Path) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(PROBE_FILE);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        file.write_all(&[0u8; PROBE_BYTES])?;
        file.sync_all()
    })();
    // Removed either way: a half-written probe must not keep a full disk full.
    let removed = std::fs::remove_file(&path);
    written?;
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The directory a path's writes land in: the path itself when it is a directory, else its parent.
pub fn dir_of(path: &Path) -> &Path {
    if path.is_dir() { path } else { path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")) }
}

/// One faulted path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFault {
    /// The file or directory whose write failed.
    pub path: PathBuf,
    /// Full or unavailable.
    pub kind: FaultKind,
    /// When it was first reported.
    pub since_ms: UnixMillis,
    /// What was being done, in words (`appending to the journal`, `committing a transaction`).
    pub op: String,
    /// The error, in words (never record content).
    pub error: String,
    /// Free space on the path's file system when last looked at.
    pub free_bytes: Option<u64>,
}

/// Something that can be made usable again after a fault (reopen a database), once its disk takes writes.
pub trait Recover: Send + Sync {
    /// Makes it usable; an error (in words) keeps the fault.
    fn recover(&self) -> Result<(), String>;
}

/// The host's record of faulted paths. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct DiskWatch {
    inner: Arc<WatchInner>,
}

#[derive(Default)]
struct WatchInner {
    faults: Mutex<BTreeMap<PathBuf, DiskFault>>,
    recoverers: Mutex<Vec<(PathBuf, Weak<dyn Recover>)>>,
    /// Who had a write refused since the last [`DiskWatch::take_refused_writers`] (tenant ids).
    refused: Mutex<std::collections::BTreeSet<String>>,
    /// Bumped on every change of the fault set.
    changed: tokio::sync::watch::Sender<u64>,
}

impl fmt::Debug for DiskWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiskWatch").field("faults", &self.faults()).finish_non_exhaustive()
    }
}

impl DiskWatch {
    /// A watch with no fault.
    pub fn new() -> Self {
        Self::default()
    }

    /// A write under `path` failed with `error` while doing `op`.
    pub fn report_io(&self, path: &Path, op: &str, error: &io::Error) {
        self.report(path, classify(error), op, error.to_string());
    }

    /// A store at `path` failed with an error its own type no longer classifies: full when its file system
    /// is (nearly) out of space, unavailable otherwise. The recovery probe refines it.
    pub fn report_store(&self, path: &Path, op: &str, error: &dyn fmt::Display) {
        let kind = match free_bytes(path) {
            Ok(free) if free < LOW_SPACE_BYTES => FaultKind::Full,
            _ => FaultKind::Unavailable,
        };
        self.report(path, kind, op, error.to_string());
    }

    /// Records a fault of `path` (the first report of a path sets its time and cause; a later one may only
    /// raise its kind to full).
    pub fn report(&self, path: &Path, kind: FaultKind, op: &str, error: String) {
        let free = free_bytes(path).ok();
        let changed = {
            let mut faults = self.inner.faults.lock().unwrap_or_else(PoisonError::into_inner);
            match faults.get_mut(path) {
                Some(existing) => {
                    existing.free_bytes = free;
                    if kind > existing.kind {
                        existing.kind = kind;
                        true
                    } else {
                        false
                    }
                }
                None => {
                    faults.insert(
                        path.to_path_buf(),
                        DiskFault {
                            path: path.to_path_buf(),
                            kind,
                            since_ms: now_millis(),
                            op: op.to_owned(),
                            error,
                            free_bytes: free,
                        },
                    );
                    true
                }
            }
        };
        if changed {
            self.inner.changed.send_modify(|n| *n += 1);
        }
    }

    /// Updates what is known about a faulted path (kind, free space) after a probe; no-op when not faulted.
    pub fn refine(&self, path: &Path, kind: FaultKind, free_bytes: Option<u64>) {
        let changed = {
            let mut faults = self.inner.faults.lock().unwrap_or_else(PoisonError::into_inner);
            match faults.get_mut(path) {
                Some(f) => {
                    f.free_bytes = free_bytes;
                    let changed = f.kind != kind;
                    f.kind = kind;
                    changed
                }
                None => false,
            }
        };
        if changed {
            self.inner.changed.send_modify(|n| *n += 1);
        }
    }

    /// Ends the fault of `path`; returns it (`None` when it was not faulted).
    pub fn clear(&self, path: &Path) -> Option<DiskFault> {
        let cleared = self.inner.faults.lock().unwrap_or_else(PoisonError::into_inner).remove(path);
        if cleared.is_some() {
            self.inner.changed.send_modify(|n| *n += 1);
        }
        cleared
    }

    /// Every faulted path, in path order.
    pub fn faults(&self) -> Vec<DiskFault> {
        self.inner.faults.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect()
    }

    /// The worst fault now (full over unavailable); `None` when every path takes writes.
    pub fn fault(&self) -> Option<FaultKind> {
        self.inner.faults.lock().unwrap_or_else(PoisonError::into_inner).values().map(|f| f.kind).max()
    }

    /// Whether `path` is faulted.
    pub fn is_faulted(&self, path: &Path) -> bool {
        self.inner.faults.lock().unwrap_or_else(PoisonError::into_inner).contains_key(path)
    }

    /// Changes of the fault set: the value rises on every report, refinement and clearing.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Notes that `writer` (a tenant id) had a write refused by a fault: its session may hold messages it
    /// could not acknowledge, which WhatsApp delivers again only on its next connect.
    pub fn note_refused_writer(&self, writer: &str) {
        let mut refused = self.inner.refused.lock().unwrap_or_else(PoisonError::into_inner);
        if !refused.contains(writer) {
            refused.insert(writer.to_owned());
        }
    }

    /// Every writer noted since the last call, emptied.
    pub fn take_refused_writers(&self) -> Vec<String> {
        std::mem::take(&mut *self.inner.refused.lock().unwrap_or_else(PoisonError::into_inner)).into_iter().collect()
    }

    /// Registers what makes `path` usable again after a fault. Held weakly: a dropped store unregisters.
    pub fn register(&self, path: &Path, recover: Weak<dyn Recover>) {
        let mut list = self.inner.recoverers.lock().unwrap_or_else(PoisonError::into_inner);
        list.retain(|(_, r)| r.strong_count() > 0);
        list.push((path.to_path_buf(), recover));
    }

    /// What makes `path` usable again, when something registered for it.
    pub fn recoverer(&self, path: &Path) -> Option<Arc<dyn Recover>> {
        let list = self.inner.recoverers.lock().unwrap_or_else(PoisonError::into_inner);
        list.iter().filter(|(p, _)| p == path).find_map(|(_, r)| r.upgrade())
    }
}

#[cfg(feature = "embedded")]
pub use redb_file::{DbGuard, RedbFile};

#[cfg(feature = "embedded")]
mod redb_file {
    use std::ops::Deref;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

    use redb::Database;

    use super::{DiskWatch, Recover};

    /// Creates a database's tables (or checks them) right after it is opened.
    pub type InitFn = fn(&Database) -> Result<(), redb::Error>;

    /// A redb database that is reopened in place after a fault (see the module docs). Every use holds a read
    /// guard for the length of its transaction, so a reopen waits for the uses in flight and none of them sees
    /// the database closed under it.
    pub struct RedbFile {
        path: PathBuf,
        init: InitFn,
        db: RwLock<Option<Database>>,
        disk: DiskWatch,
    }

    /// A database in use: derefs to the [`Database`]; a reopen waits until it is dropped.
    pub struct DbGuard<'a>(RwLockReadGuard<'a, Option<Database>>);

    impl Deref for DbGuard<'_> {
        type Target = Database;
        fn deref(&self) -> &Database {
            self.0.as_ref().expect("a guard is only made over an open database")
        }
    }

    impl std::fmt::Debug for RedbFile {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RedbFile").field("path", &self.path).finish_non_exhaustive()
        }
    }

    impl RedbFile {
        /// Opens (creating when absent) the database at `path`, runs `init` on it and registers it with `disk`
        /// as the way to recover `path`.
        pub fn open(path: &Path, init: InitFn, disk: DiskWatch) -> Result<Arc<Self>, redb::Error> {
            let db = Self::create(path, init)?;
            let file = Arc::new(Self { path: path.to_path_buf(), init, db: RwLock::new(Some(db)), disk });
            let weak: std::sync::Weak<dyn Recover> = Arc::downgrade(&file) as std::sync::Weak<RedbFile>;
            file.disk.register(path, weak);
            Ok(file)
        }

        fn create(path: &Path, init: InitFn) -> Result<Database, redb::Error> {
            let db = Database::create(path)?;
            init(&db)?;
            Ok(db)
        }

        /// The file's path.
        pub fn path(&self) -> &Path {
            &self.path
        }

        /// The database, for one use. Fails (closed) while a failed reopen left none open.
        pub fn get(&self) -> Result<DbGuard<'_>, redb::Error> {
            let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
            if guard.is_none() {
                return Err(redb::Error::DatabaseClosed);
            }
            Ok(DbGuard(guard))
        }

        /// A use of the database failed: reported to the disk watch as a fault of this file.
        pub fn failed(&self, op: &str, error: &dyn std::fmt::Display) {
            self.disk.report_store(&self.path, op, error);
        }

        /// Closes the database and opens it again (redb repairs it if it must). Waits for the uses in flight.
        /// On failure no database is open until the next reopen succeeds.
        pub fn reopen(&self) -> Result<(), redb::Error> {
            let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
            // Closed first: the file lock is released only when the old handle is gone.
            if let Some(old) = slot.take() {
                drop(old);
            }
            *slot = Some(Self::create(&self.path, self.init)?);
            Ok(())
        }
    }

    impl Recover for RedbFile {
        fn recover(&self) -> Result<(), String> {
            self.reopen().map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_and_quota_are_full_everything_else_unavailable() {
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::ENOSPC)), FaultKind::Full);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EDQUOT)), FaultKind::Full);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EIO)), FaultKind::Unavailable);
        assert_eq!(classify(&io::Error::from_raw_os_error(libc::EROFS)), FaultKind::Unavailable);
        assert_eq!(classify(&io::Error::other("anything")), FaultKind::Unavailable);
    }

    #[test]
    fn free_space_is_read_for_paths_not_created_yet() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("not/yet/there")).unwrap() > 0);
    }

    #[test]
    fn a_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        probe(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(probe(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn the_first_report_sets_the_cause_and_a_later_one_only_raises_the_kind() {
        let watch = DiskWatch::new();
        let mut changes = watch.subscribe();
        let path = Path::new("/nonexistent/data/store.redb");
        assert_eq!(watch.fault(), None);
        watch.report(path, FaultKind::Unavailable, "committing", "first".into());
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        watch.report(path, FaultKind::Unavailable, "committing", "second".into());
        assert!(!changes.has_changed().unwrap(), "the same fault again is no change");
        watch.report_io(path, "writing", &io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(changes.has_changed().unwrap());
        let faults = watch.faults();
        assert_eq!(faults.len(), 1);
        assert_eq!((faults[0].kind, faults[0].error.as_str()), (FaultKind::Full, "first"));
        assert_eq!(watch.fault(), Some(FaultKind::Full));
        assert!(watch.clear(path).is_some());
        assert_eq!(watch.fault(), None);
        assert!(watch.clear(path).is_none());
    }

    #[cfg(feature = "embedded")]
    #[test]
    fn a_redb_file_reopens_in_place_and_keeps_what_was_committed() {
        use redb::{ReadableDatabase, TableDefinition};
        const T: TableDefinition<u64, u64> = TableDefinition::new("t");
        fn init(db: &redb::Database) -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(T)?;
            txn.commit()?;
            Ok(())
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        let watch = DiskWatch::new();
        let file = RedbFile::open(&path, init, watch.clone()).unwrap();
        {
            let db = file.get().unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(T).unwrap().insert(1, 10).unwrap();
            txn.commit().unwrap();
        }
        let recover = watch.recoverer(&path).expect("registered");
        recover.recover().unwrap();
        let db = file.get().unwrap();
        let txn = db.begin_read().unwrap();
        assert_eq!(txn.open_table(T).unwrap().get(1).unwrap().unwrap().value(), 10);
        drop((txn, db, recover));
        drop(file);
        assert!(watch.recoverer(&path).is_none(), "a dropped file unregisters");
    }
}
