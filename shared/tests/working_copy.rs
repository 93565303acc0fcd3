//! The local working copy: durability, crash consistency, hydration outcomes, export files.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::contract::restorable_device;
use wakeeper_shared::crypto::Cipher;
use wakeeper_shared::domain::{
    ChangeBatch, CredentialSnapshot, DeviceRecord, MAX_RECORD_VALUE_LEN, RecordChange, RecordKey, RecordKind, TenantId,
};
use wakeeper_shared::local::hydrate::{HydrateOutcome, Hydrator, hydrate, needs_hydration};
use wakeeper_shared::local::{
    ExportError, WorkingCopy, WorkingCopyError, export_snapshot, import_snapshot, read_export_file, tenant_dir,
    write_export_file,
};
use wakeeper_shared::ports::{CredentialStore, StoreError, StoredAt};

fn cipher() -> Cipher {
    Cipher::new(&[7; 32])
}

fn tid(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

fn put(kind: RecordKind, key: &str, value: &[u8]) -> RecordChange {
    RecordChange { key: RecordKey::new(kind, key), value: Some(value.to_vec()) }
}

fn del(kind: RecordKind, key: &str) -> RecordChange {
    RecordChange { key: RecordKey::new(kind, key), value: None }
}

/// The workspace's restorable device under a push name the leak checks below look for.
fn device() -> DeviceRecord {
    DeviceRecord { push_name: "Pizzeria".into(), ..restorable_device() }
}

fn restorable(generation: u64, extra: usize) -> CredentialSnapshot {
    let mut s = CredentialSnapshot { generation, ..Default::default() };
    s.set_device(&device());
    for i in 0..extra {
        s.records.insert(RecordKey::new(RecordKind::Session, format!("55119{i}@c.us.0")), vec![i as u8; 300]);
    }
    s
}

fn open(dir: &Path, t: &str) -> WorkingCopy {
    WorkingCopy::open(dir, tid(t), cipher()).unwrap()
}

#[test]
fn missing_copy_loads_as_none_and_appends_start_from_generation_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    assert!(!wc.exists());
    assert_eq!(wc.generation(), None);
    assert_eq!(wc.load().unwrap(), None);
    assert!(!tenant_dir(dir.path(), &tid("t1")).exists(), "open and load create nothing");

    assert_eq!(wc.append(&[put(RecordKind::PreKey, "1", b"a")]).unwrap(), 1);
    assert_eq!(wc.append(&[put(RecordKind::PreKey, "2", b"b"), del(RecordKind::PreKey, "1")]).unwrap(), 2);
    assert_eq!(wc.append(&[]).unwrap(), 2, "an empty batch writes nothing");
    let loaded = open(dir.path(), "t1").load().unwrap().unwrap();
    assert_eq!(loaded.generation, 2);
    assert_eq!(loaded.records, BTreeMap::from([(RecordKey::new(RecordKind::PreKey, "2"), b"b".to_vec())]));
}

#[test]
fn base_plus_journal_round_trips_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    let mut expected = restorable(40, 5);
    wc.write_base(&expected).unwrap();
    assert_eq!(wc.generation(), Some(40));
    let batches = [
        vec![put(RecordKind::Session, "a@c.us.0", b"s1"), put(RecordKind::Identity, "a@c.us.0", &[9; 32])],
        vec![del(RecordKind::Session, "551190@c.us.0"), put(RecordKind::Session, "a@c.us.0", b"s2")],
        vec![put(RecordKind::Other, "empty", b"")],
    ];
    for (i, b) in batches.iter().enumerate() {
        assert_eq!(wc.append(b).unwrap(), 41 + i as u64);
        expected.apply(b);
    }
    expected.generation = 43;
    assert_eq!(wc.load().unwrap().unwrap(), expected);
    let reopened = open(dir.path(), "t1");
    assert_eq!(reopened.generation(), Some(43));
    assert_eq!(reopened.torn_tail_bytes(), 0);
    assert_eq!(reopened.load().unwrap().unwrap(), expected);
}

#[test]
fn large_batches_raise_the_generation_by_one_per_started_500() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    let big: Vec<_> = (0..1001).map(|i| put(RecordKind::PreKey, &i.to_string(), b"k")).collect();
    assert_eq!(wc.append(&big).unwrap(), 3);
    assert_eq!(wc.append(&big[..500]).unwrap(), 4);
}

#[test]
fn record_locations_read_back_single_values() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    wc.write_base(&restorable(1, 3)).unwrap();
    let (_, locs) = wc.append_located(&[put(RecordKind::PreKey, "7", b"seven"), del(RecordKind::PreKey, "8")]).unwrap();
    let reader = wc.reader();
    assert_eq!(reader.read(locs[0], &RecordKey::new(RecordKind::PreKey, "7")).unwrap(), Some(b"seven".to_vec()));
    assert_eq!(reader.read(locs[1], &RecordKey::new(RecordKind::PreKey, "8")).unwrap(), None);
    assert!(matches!(
        reader.read(locs[0], &RecordKey::new(RecordKind::PreKey, "8")),
        Err(WorkingCopyError::Corrupt(_))
    ));

    let mut seen = Vec::new();
    wc.scan(|item| seen.push((item.key, item.loc))).unwrap();
    for (key, loc) in seen.iter().filter(|(k, _)| k.kind == RecordKind::Session) {
        assert_eq!(reader.read(*loc, key).unwrap().unwrap().len(), 300);
    }
}

#[test]
fn permissions_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    wc.write_base(&restorable(1, 1)).unwrap();
    wc.append(&[put(RecordKind::PreKey, "1", b"x")]).unwrap();
    let tdir = tenant_dir(dir.path(), &tid("t1"));
    assert_eq!(std::fs::metadata(&tdir).unwrap().permissions().mode() & 0o777, 0o700);
    for entry in std::fs::read_dir(&tdir).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(entry.metadata().unwrap().permissions().mode() & 0o777, 0o600, "{:?}", entry.file_name());
    }
}

#[test]
fn nothing_readable_is_left_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    wc.write_base(&restorable(1, 0)).unwrap();
    wc.append(&[put(RecordKind::Session, "5511987650001@c.us.0", b"SESSIONSECRET")]).unwrap();
    for entry in std::fs::read_dir(tenant_dir(dir.path(), &tid("t1"))).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        for needle in [&b"5511987650001"[..], b"SESSIONSECRET", b"Pizzeria", b"session"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle));
        }
    }
}

#[test]
fn corrupt_base_is_distinct_from_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    wc.write_base(&restorable(3, 2)).unwrap();
    let base = tenant_dir(dir.path(), &tid("t1")).join("base.wkc");
    let mut bytes = std::fs::read(&base).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&base, &bytes).unwrap();
    let wc = open(dir.path(), "t1");
    assert!(wc.exists());
    assert_eq!(wc.generation(), None);
    assert!(matches!(wc.load(), Err(WorkingCopyError::Corrupt(_))));

    // Another data key: structurally fine, but nothing decrypts.
    let dir2 = tempfile::tempdir().unwrap();
    open(dir2.path(), "t1").write_base(&restorable(3, 2)).unwrap();
    let other = WorkingCopy::open(dir2.path(), tid("t1"), Cipher::new(&[8; 32])).unwrap();
    assert!(matches!(other.load(), Err(WorkingCopyError::Corrupt(_))));
    // Another tenant's files moved in: refused too.
    std::fs::rename(tenant_dir(dir2.path(), &tid("t1")), tenant_dir(dir2.path(), &tid("t2"))).unwrap();
    assert!(matches!(open(dir2.path(), "t2").load(), Err(WorkingCopyError::Corrupt(_))));
}

#[test]
fn unrenamed_temp_file_leaves_the_old_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    let old = restorable(5, 2);
    wc.write_base(&old).unwrap();
    wc.append(&[put(RecordKind::PreKey, "1", b"x")]).unwrap();
    let mut expected = old.clone();
    expected.apply(&[put(RecordKind::PreKey, "1", b"x")]);
    expected.generation = 6;

    // A complete new base written to the temp name, and a half-written one: neither was renamed.
    let staging = tempfile::tempdir().unwrap();
    open(staging.path(), "t1").write_base(&restorable(99, 7)).unwrap();
    let complete = std::fs::read(tenant_dir(staging.path(), &tid("t1")).join("base.wkc")).unwrap();
    let tmp = tenant_dir(dir.path(), &tid("t1")).join("base.wkc.tmp");
    for partial in [&complete[..], &complete[..complete.len() / 3]] {
        std::fs::write(&tmp, partial).unwrap();
        let wc = open(dir.path(), "t1");
        assert_eq!(wc.load().unwrap().unwrap(), expected);
        assert!(!tmp.exists(), "the stale temp file is cleaned up");
    }
}

#[test]
fn crash_between_base_rename_and_journal_reset_gives_the_new_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    wc.write_base(&restorable(5, 1)).unwrap();
    for i in 0..4 {
        wc.append(&[put(RecordKind::PreKey, &i.to_string(), b"old history")]).unwrap();
    }
    let journal = tenant_dir(dir.path(), &tid("t1")).join("journal.wkc");
    let old_journal = std::fs::read(&journal).unwrap();
    let new = restorable(7, 3);
    wc.write_base(&new).unwrap();
    // Put the old journal back, as if the crash came before its reset.
    std::fs::write(&journal, &old_journal).unwrap();
    let mut wc = open(dir.path(), "t1");
    assert_eq!(wc.generation(), Some(7));
    assert_eq!(wc.load().unwrap().unwrap(), new, "the old base's journal is not replayed on the new base");
    assert_eq!(wc.append(&[put(RecordKind::PreKey, "9", b"new")]).unwrap(), 8);
    let loaded = open(dir.path(), "t1").load().unwrap().unwrap();
    assert_eq!(loaded.generation, 8);
    assert_eq!(loaded.records.len(), new.records.len() + 1);
}

#[test]
fn torn_journal_tail_gives_the_last_whole_batch_at_every_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    let base = restorable(10, 2);
    wc.write_base(&base).unwrap();
    let b1 = vec![put(RecordKind::Session, "a@c.us.0", b"one")];
    let b2 = vec![put(RecordKind::Session, "a@c.us.0", b"two"), put(RecordKind::PreKey, "3", &[3; 90])];
    wc.append(&b1).unwrap();
    let journal = tenant_dir(dir.path(), &tid("t1")).join("journal.wkc");
    let after_b1 = std::fs::read(&journal).unwrap().len();
    wc.append(&b2).unwrap();
    let full = std::fs::read(&journal).unwrap();

    let mut s1 = base.clone();
    s1.apply(&b1);
    s1.generation = 11;
    let mut s2 = s1.clone();
    s2.apply(&b2);
    s2.generation = 12;

    for cut in after_b1..full.len() {
        std::fs::write(&journal, &full[..cut]).unwrap();
        let wc = open(dir.path(), "t1");
        assert_eq!(wc.load().unwrap().unwrap(), s1, "cut at {cut}");
        assert_eq!(wc.torn_tail_bytes(), (cut - after_b1) as u64);
    }
    // Garbage (a zero-filled extension, a flipped bit in the last entry) is a torn tail as well.
    let mut zeros = full.clone();
    zeros.extend_from_slice(&[0; 4096]);
    std::fs::write(&journal, &zeros).unwrap();
    assert_eq!(open(dir.path(), "t1").load().unwrap().unwrap(), s2);
    let mut flipped = full.clone();
    *flipped.last_mut().unwrap() ^= 1;
    std::fs::write(&journal, &flipped).unwrap();
    assert_eq!(open(dir.path(), "t1").load().unwrap().unwrap(), s1);

    // The next append cuts the torn tail off and lands where replay will find it.
    let mut wc = open(dir.path(), "t1");
    assert_eq!(wc.append(&b2).unwrap(), 12);
    assert_eq!(open(dir.path(), "t1").load().unwrap().unwrap(), s2);
}

#[test]
fn compaction_folds_the_journal_into_a_new_base() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    wc.set_compaction_floor(4 * 1024);
    wc.write_base(&restorable(1, 2)).unwrap();
    let mut n = 0;
    while !wc.needs_compaction() {
        n += 1;
        wc.append(&[put(RecordKind::Session, "hot@c.us.0", &vec![n as u8; 500])]).unwrap();
        assert!(n < 100, "compaction never suggested");
    }
    let before = wc.load().unwrap().unwrap();
    let journal_before = wc.journal_bytes();
    wc.compact().unwrap();
    assert!(wc.journal_bytes() < journal_before / 10);
    assert!(!wc.needs_compaction());
    assert_eq!(wc.generation(), Some(before.generation));
    assert_eq!(open(dir.path(), "t1").load().unwrap().unwrap(), before);
}

#[test]
fn delete_removes_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    wc.write_base(&restorable(1, 1)).unwrap();
    wc.delete().unwrap();
    assert!(!tenant_dir(dir.path(), &tid("t1")).exists());
    assert_eq!(wc.load().unwrap(), None);
    wc.delete().unwrap();
}

#[test]
fn deleting_a_copy_on_a_fresh_data_dir_is_a_no_op() {
    // Linking a first tenant on a new host discards a copy whose parent directories do not exist yet.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("never-created");
    let mut wc = open(&data, "t1");
    wc.delete().unwrap();
    assert!(!data.exists());
}

/// A tenant directory, or a file in it, replaced by a symlink is refused: nothing is read or written through
/// it, so nothing lands outside the data dir.
#[test]
fn symlinked_tenant_directories_and_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (data, outside) = (dir.path().join("data"), dir.path().join("outside"));
    std::fs::create_dir_all(&outside).unwrap();
    let t = tid("t1");
    let tenant = tenant_dir(&data, &t);
    std::fs::create_dir_all(tenant.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&outside, &tenant).unwrap();
    match WorkingCopy::open(&data, t.clone(), cipher()) {
        Err(e @ WorkingCopyError::Refused(_)) => assert!(e.to_string().contains("symbolic link"), "{e}"),
        other => panic!("a symlinked tenant directory: want Refused, got {other:?}"),
    }
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written outside the data dir");

    std::fs::remove_file(&tenant).unwrap();
    let mut wc = open(&data, "t1");
    wc.write_base(&restorable(1, 0)).unwrap();
    drop(wc);
    let journal = tenant.join("journal.wkc");
    std::fs::rename(&journal, outside.join("journal.wkc")).unwrap();
    std::os::unix::fs::symlink(outside.join("journal.wkc"), &journal).unwrap();
    assert!(matches!(WorkingCopy::open(&data, t, cipher()), Err(WorkingCopyError::Refused(_))), "a symlinked journal");
}

#[test]
fn overlong_keys_and_values_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut wc = open(dir.path(), "t1");
    let long = "x".repeat(1025);
    assert!(matches!(wc.append(&[put(RecordKind::Other, &long, b"")]), Err(WorkingCopyError::Invalid(_))));
    let g = wc.append(&[put(RecordKind::Other, "ok", b"x")]).unwrap();
    let big = vec![0u8; MAX_RECORD_VALUE_LEN + 1];
    let refused = wc.append(&[put(RecordKind::Session, "s.0", b"fine"), put(RecordKind::Other, "big", &big)]);
    assert!(matches!(&refused, Err(WorkingCopyError::Invalid(m)) if m.contains("may hold")), "{refused:?}");
    assert_eq!(wc.generation(), Some(g), "the refused batch wrote nothing");
    assert_eq!(open(dir.path(), "t1").load().unwrap().unwrap().records.len(), 1, "nor did it reach the disk");
}

// --- a writer killed with SIGKILL -------------------------------------------------------------------------------

const CHILD_DIR_ENV: &str = "WAKEEPER_WC_KILL_CHILD_DIR";
const SLOTS: u64 = 7;

/// Batch `i` of the child's deterministic history.
fn history_batch(i: u64) -> Vec<RecordChange> {
    vec![
        put(RecordKind::Other, "counter", &i.to_le_bytes()),
        put(RecordKind::Session, &format!("slot{}", i % SLOTS), &vec![i as u8; 1500]),
        del(RecordKind::Session, &format!("slot{}", (i + 3) % SLOTS)),
    ]
}

fn history_state(n: u64) -> CredentialSnapshot {
    let mut s = CredentialSnapshot::default();
    for i in 1..=n {
        s.apply(&history_batch(i));
    }
    s.generation = n;
    s
}

fn child_writer(dir: &Path) -> ! {
    let mut wc = open(dir, "victim");
    wc.set_compaction_floor(32 * 1024);
    let mut i = wc.generation().unwrap_or(0);
    loop {
        i += 1;
        assert_eq!(wc.append(&history_batch(i)).unwrap(), i);
        println!("acked {i}");
        if wc.needs_compaction() {
            wc.compact().unwrap();
        }
    }
}

#[test]
fn killed_writer_leaves_a_consistent_copy() {
    if let Ok(dir) = std::env::var(CHILD_DIR_ENV) {
        child_writer(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut last = 0u64;
    for round in 0..5 {
        let mut child = Command::new(&exe)
            .args(["--exact", "killed_writer_leaves_a_consistent_copy", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("acked ") {
                    let _ = tx.send(n.parse::<u64>().unwrap());
                }
            }
        });
        // Let it get well into its work (compactions included), then kill it mid-stride.
        let target = last + 150 + round * 37;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut acked = last;
        while acked < target {
            let left = deadline.saturating_duration_since(Instant::now());
            acked = rx.recv_timeout(left).expect("child made no progress");
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        while let Ok(n) = rx.try_recv() {
            acked = acked.max(n);
        }
        let wc = open(dir.path(), "victim");
        let loaded = wc.load().unwrap().expect("a copy exists");
        assert!(
            loaded.generation == acked || loaded.generation == acked + 1,
            "round {round}: acked {acked}, loaded {}",
            loaded.generation
        );
        assert_eq!(loaded, history_state(loaded.generation), "round {round}: state is exactly a prefix of history");
        last = loaded.generation;
    }
}

// --- export files ---------------------------------------------------------------------------------------------------

#[test]
fn export_round_trips_and_refuses_tampering() {
    let snap = restorable(17, 4);
    let blob = export_snapshot(&cipher(), &tid("t1"), &snap);
    let (header, back) = import_snapshot(&cipher(), &blob).unwrap();
    assert_eq!(header.tenant, tid("t1"));
    assert_eq!(header.generation, 17);
    assert_eq!(header.records, snap.records.len() as u64);
    assert_eq!(back, snap);
    assert!(!blob.windows(8).any(|w| w == b"Pizzeria"));

    assert!(matches!(import_snapshot(&Cipher::new(&[1; 32]), &blob), Err(ExportError::Undecryptable)));
    let mut tampered = blob.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(matches!(import_snapshot(&cipher(), &tampered), Err(ExportError::Undecryptable)));
    // The header is authenticated: renaming the tenant in it breaks the import.
    let mut renamed = blob.clone();
    let at = renamed.windows(2).position(|w| w == b"t1").unwrap();
    renamed[at + 1] = b'2';
    assert!(matches!(import_snapshot(&cipher(), &renamed), Err(ExportError::Undecryptable)));
    assert!(matches!(import_snapshot(&cipher(), b"hello"), Err(ExportError::Format)));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t1.wksnap");
    write_export_file(&path, &cipher(), &tid("t1"), &snap).unwrap();
    assert_eq!(read_export_file(&path, &cipher()).unwrap().1, snap);
}

// --- hydration ------------------------------------------------------------------------------------------------------

/// A credential store that fails in chosen ways for chosen tenants, over a real embedded store.
struct Faulty {
    inner: EmbeddedStore,
    reads: AtomicUsize,
}

#[async_trait]
impl CredentialStore for Faulty {
    async fn read(&self, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        match tenant.as_str() {
            "down" => Err(StoreError::Unavailable("simulated outage".into())),
            "boom" => panic!("simulated bug"),
            _ => self.inner.read(tenant).await,
        }
    }
    async fn generation(&self, tenant: &TenantId) -> Result<Option<u64>, StoreError> {
        match tenant.as_str() {
            "down" => Err(StoreError::Unavailable("simulated outage".into())),
            _ => self.inner.generation(tenant).await,
        }
    }
    async fn write(&self, tenant: &TenantId, batch: &ChangeBatch) -> Result<(), StoreError> {
        self.inner.write(tenant, batch).await
    }
    async fn replace(&self, tenant: &TenantId, snapshot: &CredentialSnapshot, epoch: u64) -> Result<(), StoreError> {
        self.inner.replace(tenant, snapshot, epoch).await
    }
    async fn claim(&self, tenant: &TenantId, epoch: u64) -> Result<Option<StoredAt>, StoreError> {
        self.inner.claim(tenant, epoch).await
    }
    async fn delete(&self, tenant: &TenantId, epoch: u64) -> Result<(), StoreError> {
        self.inner.delete(tenant, epoch).await
    }
    async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.inner.list_tenants().await
    }
}

fn embedded(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir.join("store.redb"), cipher()).unwrap()
}

#[tokio::test]
async fn hydration_outcomes_are_distinct() {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded(dir.path());
    store.replace(&tid("good"), &restorable(12, 3), 1).await.unwrap();
    let mut incomplete = restorable(4, 1);
    let mut d = device();
    d.account = None;
    incomplete.set_device(&d);
    store.replace(&tid("partial"), &incomplete, 1).await.unwrap();
    let faulty = Faulty { inner: store.clone(), reads: AtomicUsize::new(0) };

    let out = hydrate(&faulty, dir.path(), &tid("good"), &cipher()).await;
    assert_eq!(out, HydrateOutcome::Hydrated { generation: 12, records: 4 });
    assert_eq!(open(dir.path(), "good").load().unwrap().unwrap(), restorable(12, 3));

    assert_eq!(hydrate(&faulty, dir.path(), &tid("nobody"), &cipher()).await, HydrateOutcome::Missing);
    assert!(
        matches!(hydrate(&faulty, dir.path(), &tid("partial"), &cipher()).await, HydrateOutcome::Corrupt(r) if r.contains("account"))
    );
    assert!(!open(dir.path(), "partial").exists(), "an unrestorable snapshot is not installed");
    let down = hydrate(&faulty, dir.path(), &tid("down"), &cipher()).await;
    assert!(down.is_transient(), "{down:?}");

    // A record sealed for another tenant makes the stored snapshot corrupt, not missing.
    let swapped = Cipher::new(&[9; 32]);
    let other = EmbeddedStore::open(dir.path().join("other.redb"), swapped).unwrap();
    other.replace(&tid("good"), &restorable(1, 0), 1).await.unwrap();
    drop(other);
    let wrong_key = EmbeddedStore::open(dir.path().join("other.redb"), cipher()).unwrap();
    assert!(matches!(hydrate(&wrong_key, dir.path(), &tid("good"), &cipher()).await, HydrateOutcome::Corrupt(_)));
}

#[tokio::test]
async fn needs_hydration_compares_generations() {
    let dir = tempfile::tempdir().unwrap();
    let store = embedded(dir.path());
    let t = tid("t1");
    assert!(needs_hydration(&store, dir.path(), &t, &cipher()).await.unwrap(), "no local copy");
    store.replace(&t, &restorable(5, 0), 1).await.unwrap();
    hydrate(&store, dir.path(), &t, &cipher()).await;
    assert!(!needs_hydration(&store, dir.path(), &t, &cipher()).await.unwrap());
    store.replace(&t, &restorable(6, 0), 1).await.unwrap();
    assert!(needs_hydration(&store, dir.path(), &t, &cipher()).await.unwrap(), "remote is newer");
}

#[tokio::test]
async fn prepare_pushes_a_newer_local_copy_up_instead_of_overwriting_it() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn CredentialStore> = Arc::new(embedded(dir.path()));
    let h = Hydrator::new(store.clone(), dir.path(), cipher());
    let t = tid("t1");
    store.replace(&t, &restorable(5, 1), 3).await.unwrap();
    assert_eq!(h.prepare(&t, 3).await, HydrateOutcome::Hydrated { generation: 5, records: 2 });
    assert_eq!(h.prepare(&t, 3).await, HydrateOutcome::UpToDate { generation: 5 });

    // The host wrote locally, then crashed before replicating; its disk survived.
    let mut wc = open(dir.path(), "t1");
    wc.append(&[put(RecordKind::Session, "new@c.us.0", b"advanced ratchet")]).unwrap();
    let local = wc.load().unwrap().unwrap();
    assert_eq!(h.prepare(&t, 4).await, HydrateOutcome::PushedLocal { generation: 6 });
    assert_eq!(store.read(&t).await.unwrap(), local);
    assert_eq!(open(dir.path(), "t1").load().unwrap().unwrap(), local, "the local copy was kept");

    // A push with an epoch older than one the store has seen is fenced.
    open(dir.path(), "t1").append(&[put(RecordKind::PreKey, "1", b"x")]).unwrap();
    assert!(matches!(h.prepare(&t, 2).await, HydrateOutcome::Fenced(_)));

    // The store moved ahead (another host's replication): the store's copy wins.
    store.replace(&t, &restorable(50, 0), 9).await.unwrap();
    assert_eq!(h.prepare(&t, 9).await, HydrateOutcome::Hydrated { generation: 50, records: 1 });

    // No remote credentials but a usable local copy (paired here, never replicated): pushed.
    let t2 = tid("fresh");
    open(dir.path(), "fresh").write_base(&restorable(0, 0)).unwrap();
    open(dir.path(), "fresh").append(&[put(RecordKind::PreKey, "1", b"x")]).unwrap();
    assert_eq!(h.prepare(&t2, 1).await, HydrateOutcome::PushedLocal { generation: 1 });
    assert_eq!(h.prepare(&tid("ghost"), 1).await, HydrateOutcome::Missing);
}

/// Host A hydrated under epoch 1 and wrote locally past the store, then died; B took over (epoch 2) and wrote a
/// lower generation. When A takes the tenant back, its copy is a fenced-off owner's: B's state wins, although
/// A's copy has more generations.
#[tokio::test]
async fn prepare_never_pushes_a_fenced_off_owners_copy_over_a_newer_owners() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn CredentialStore> = Arc::new(embedded(dir.path()));
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let (a, b) = (Hydrator::new(store.clone(), &a_dir, cipher()), Hydrator::new(store.clone(), &b_dir, cipher()));
    let t = tid("t1");
    store.replace(&t, &restorable(5, 1), 1).await.unwrap();

    let mut on_a = a.prepare_copy(&t, 1).await.expect("A hydrates").copy;
    for i in 0..3 {
        on_a.append(&[put(RecordKind::Session, &format!("a{i}@c.us.0"), b"A's ratchet")]).unwrap();
    }
    assert_eq!((on_a.generation(), on_a.epoch()), (Some(8), Some(1)), "A wrote three batches under epoch 1");
    drop(on_a);

    let on_b = b.prepare_copy(&t, 2).await.expect("B hydrates");
    assert_eq!(on_b.outcome, HydrateOutcome::Hydrated { generation: 5, records: 2 });
    let mut bs = on_b.copy.load().unwrap().unwrap();
    bs.records.insert(RecordKey::new(RecordKind::Session, "b@c.us.0"), b"B's ratchet".to_vec());
    bs.generation = 6;
    store.replace(&t, &bs, 2).await.unwrap();

    let back = a.prepare_copy(&t, 3).await.expect("A takes the tenant back");
    assert_eq!(back.outcome, HydrateOutcome::Hydrated { generation: 6, records: 3 }, "the store's copy wins");
    assert_eq!(store.read(&t).await.unwrap(), bs, "B's state is untouched");
    assert_eq!(back.copy.load().unwrap().unwrap(), bs, "A continues from B's state");
}

#[tokio::test]
async fn prepare_replaces_a_corrupt_local_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn CredentialStore> = Arc::new(embedded(dir.path()));
    let h = Hydrator::new(store.clone(), dir.path(), cipher());
    let t = tid("t1");
    store.replace(&t, &restorable(5, 1), 1).await.unwrap();
    std::fs::create_dir_all(tenant_dir(dir.path(), &t)).unwrap();
    std::fs::write(tenant_dir(dir.path(), &t).join("base.wkc"), b"garbage").unwrap();
    assert_eq!(h.prepare(&t, 1).await, HydrateOutcome::Hydrated { generation: 5, records: 2 });
    assert_eq!(open(dir.path(), "t1").load().unwrap().unwrap(), restorable(5, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydrate_many_isolates_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let inner = embedded(dir.path());
    let mut ids = Vec::new();
    for i in 0..20 {
        let t = tid(&format!("ok{i}"));
        inner.replace(&t, &restorable(i + 1, 2), 1).await.unwrap();
        ids.push(t);
    }
    ids.insert(3, tid("down"));
    ids.insert(7, tid("boom"));
    ids.insert(11, tid("missing"));
    let store = Arc::new(Faulty { inner, reads: AtomicUsize::new(0) });
    let h = Hydrator::new(store.clone(), dir.path(), cipher());
    let results: BTreeMap<_, _> = h.hydrate_many(ids.clone(), 4).await.into_iter().collect();
    assert_eq!(results.len(), ids.len());
    assert_eq!(store.reads.load(Ordering::SeqCst), ids.len());
    for i in 0..20u64 {
        assert_eq!(results[&tid(&format!("ok{i}"))], HydrateOutcome::Hydrated { generation: i + 1, records: 3 });
    }
    assert!(results[&tid("down")].is_transient());
    assert!(matches!(&results[&tid("boom")], HydrateOutcome::Unavailable(r) if r.contains("task")));
    assert_eq!(results[&tid("missing")], HydrateOutcome::Missing);
}

#[tokio::test]
async fn prepare_rehydrates_a_same_generation_copy_that_does_not_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn CredentialStore> = Arc::new(embedded(dir.path()));
    let h = Hydrator::new(store.clone(), dir.path(), cipher());
    let t = tid("t1");
    store.replace(&t, &restorable(5, 1), 1).await.unwrap();
    // Same generation, sound structure, but sealed with another data key.
    WorkingCopy::open(dir.path(), t.clone(), Cipher::new(&[1; 32])).unwrap().write_base(&restorable(5, 1)).unwrap();
    assert_eq!(h.prepare(&t, 1).await, HydrateOutcome::Hydrated { generation: 5, records: 2 });
    assert_eq!(h.prepare(&t, 1).await, HydrateOutcome::UpToDate { generation: 5 });
    assert_eq!(open(dir.path(), "t1").load().unwrap().unwrap(), restorable(5, 1));
}

#[test]
fn a_hydrated_copy_is_made_durable_by_the_first_append_of_any_instance() {
    let dir = tempfile::tempdir().unwrap();
    let base = restorable(4, 2);
    let mut wc = open(dir.path(), "t1");
    wc.write_hydrated_base(&base).unwrap();
    assert!(wc.is_unsynced());
    assert_eq!(wc.load().unwrap().unwrap(), base, "readable at once");
    // Another instance (the engine store opens its own) sees the mark and syncs before its first append.
    let mut engine = open(dir.path(), "t1");
    assert!(engine.is_unsynced());
    assert_eq!(engine.append(&[]).unwrap(), 4, "an empty batch writes nothing");
    assert!(engine.is_unsynced());
    assert_eq!(engine.append(&[put(RecordKind::PreKey, "1", b"x")]).unwrap(), 5);
    assert!(!engine.is_unsynced());
    let reopened = open(dir.path(), "t1");
    assert!(!reopened.is_unsynced(), "the mark is gone from the journal");
    let mut expected = base.clone();
    expected.apply(&[put(RecordKind::PreKey, "1", b"x")]);
    expected.generation = 5;
    assert_eq!(reopened.load().unwrap().unwrap(), expected);
    // A durable replacement (compaction, import) of a hydrated copy leaves no mark either.
    let mut again = open(dir.path(), "t2");
    again.write_hydrated_base(&base).unwrap();
    again.write_base(&restorable(6, 1)).unwrap();
    assert!(!again.is_unsynced() && !open(dir.path(), "t2").is_unsynced());
}

#[test]
fn an_unsynced_journal_marks_the_copy_even_before_its_base_is_written() {
    // Hydration writes the journal first: a failure before the base leaves the old base and a journal that
    // names the new one. The old copy still loads, and its next append makes everything durable first.
    let dir = tempfile::tempdir().unwrap();
    let old = restorable(3, 1);
    let mut wc = open(dir.path(), "t1");
    wc.write_base(&old).unwrap();
    let staging = tempfile::tempdir().unwrap();
    open(staging.path(), "t1").write_hydrated_base(&restorable(9, 4)).unwrap();
    let journal = tenant_dir(staging.path(), &tid("t1")).join("journal.wkc");
    std::fs::copy(&journal, tenant_dir(dir.path(), &tid("t1")).join("journal.wkc")).unwrap();
    let mut wc = open(dir.path(), "t1");
    assert!(wc.is_unsynced());
    assert_eq!(wc.load().unwrap().unwrap(), old, "the journal of another base is not replayed");
    assert_eq!(wc.append(&[put(RecordKind::PreKey, "1", b"x")]).unwrap(), 4);
    let reopened = open(dir.path(), "t1");
    assert!(!reopened.is_unsynced());
    assert_eq!(reopened.load().unwrap().unwrap().generation, 4);
}

/// A name and what it does to a base file.
type Damage = (&'static str, fn(&Path));

#[tokio::test]
async fn a_hydrated_copy_lost_in_a_crash_is_hydrated_again() {
    // What a crash may leave of a copy hydrated without fsync: no base, an empty or cut base, the journal
    // without its base. Every case reads back as missing or corrupt, and the store's copy is used again.
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn CredentialStore> = Arc::new(embedded(dir.path()));
    let h = Hydrator::new(store.clone(), dir.path(), cipher());
    let t = tid("t1");
    let snapshot = restorable(5, 2);
    store.replace(&t, &snapshot, 1).await.unwrap();
    let base = tenant_dir(dir.path(), &t).join("base.wkc");
    let damages: [Damage; 3] = [
        ("no base", |p| std::fs::remove_file(p).unwrap()),
        ("empty base", |p| std::fs::write(p, b"").unwrap()),
        ("cut base", |p| {
            let bytes = std::fs::read(p).unwrap();
            std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
        }),
    ];
    for (what, damage) in damages {
        assert_eq!(h.prepare(&t, 1).await, HydrateOutcome::Hydrated { generation: 5, records: 3 }, "{what}");
        assert!(open(dir.path(), "t1").is_unsynced(), "{what}");
        damage(&base);
        assert_eq!(h.prepare(&t, 1).await, HydrateOutcome::Hydrated { generation: 5, records: 3 }, "{what}");
        assert_eq!(open(dir.path(), "t1").load().unwrap().unwrap(), snapshot, "{what}");
        std::fs::remove_dir_all(tenant_dir(dir.path(), &t)).unwrap();
    }
}
