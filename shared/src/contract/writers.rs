//! A randomized model check of the fence: two or three writers share one tenant, taking it over from each
//! other, pausing (writing on with an epoch that was fenced meanwhile), retrying batches whose
//! acknowledgement was lost, deleting and crashing, in an order a seed decides. After every step the store
//! must hold exactly the acknowledged writes in fence order: nothing acknowledged to the current holder
//! missing, nothing from a fenced-off writer after its fence present.

use super::*;

/// How much of the model check one run does.
#[derive(Debug, Clone, Copy)]
pub struct ModelRun {
    /// The first seed; seeds `first_seed .. first_seed + seeds` run one after another.
    pub first_seed: u64,
    /// How many seeds.
    pub seeds: u64,
    /// Steps per seed.
    pub steps: usize,
    /// Writers sharing the tenant (2 or 3).
    pub writers: usize,
}

impl ModelRun {
    /// A run of `seeds` seeds of `steps` steps over three writers, unless `WAKEEPER_MODEL_SEEDS` /
    /// `WAKEEPER_MODEL_STEPS` say more (`scripts/fuzz` sets them for the long run).
    pub fn from_env(seeds: u64, steps: usize) -> Self {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok());
        ModelRun {
            first_seed: var("WAKEEPER_MODEL_FIRST_SEED").unwrap_or(1),
            seeds: var("WAKEEPER_MODEL_SEEDS").unwrap_or(seeds),
            steps: var("WAKEEPER_MODEL_STEPS").map_or(steps, |s| s as usize),
            writers: 3,
        }
    }
}

/// Runs the model check against `store`; panics naming the seed and step of the first broken rule.
pub async fn writers_model_check(store: &dyn CredentialStore, run: ModelRun) {
    for seed in run.first_seed..run.first_seed + run.seeds {
        let mut world = World::new(store, seed, run.writers);
        for step in 0..run.steps {
            let op = world.pick();
            let what = format!("seed {seed} step {step} ({op:?})");
            world.apply(op, &what).await;
            world.check(&what).await;
        }
    }
}

/// One thing a writer does.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Claims a new epoch, then reads the tenant (a restore, a failover, a link).
    TakeOver { writer: usize, stale_local_copy: bool },
    /// Commits the writer's next batch.
    Write { writer: usize, ack_lost: bool },
    /// Sends again the writer's last batch whose acknowledgement was lost.
    Retry { writer: usize },
    /// Deletes the tenant (logout) under the writer's epoch.
    Delete { writer: usize },
    /// The writer's process dies: it forgets its epoch and anything unsent.
    Crash { writer: usize },
}

#[derive(Default)]
struct Writer {
    /// The epoch the writer writes with; `None` until it takes the tenant over (or after a crash).
    epoch: Option<u64>,
    next_generation: u64,
    /// The writer's view of the tenant's records (what it hydrated, plus what it wrote).
    view: CredentialSnapshot,
    /// A batch the store applied whose acknowledgement the writer never saw.
    unacknowledged: Option<ChangeBatch>,
    written: u64,
}

struct World<'a> {
    store: &'a dyn CredentialStore,
    tenant: TenantId,
    rng: SplitMix,
    writers: Vec<Writer>,
    /// The newest epoch any takeover has claimed.
    newest_epoch: u64,
    /// What the store must hold: the acknowledged writes applied in fence order (`None`: nothing stored).
    model: Option<CredentialSnapshot>,
}

impl<'a> World<'a> {
    fn new(store: &'a dyn CredentialStore, seed: u64, writers: usize) -> Self {
        World {
            store,
            tenant: fresh_tenant(),
            rng: SplitMix(seed),
            writers: (0..writers).map(|_| Writer::default()).collect(),
            newest_epoch: 0,
            model: None,
        }
    }

    fn pick(&mut self) -> Op {
        let writer = self.rng.below(self.writers.len() as u64) as usize;
        match self.rng.below(100) {
            0..=14 => Op::TakeOver { writer, stale_local_copy: self.rng.below(4) == 0 },
            15..=74 => Op::Write { writer, ack_lost: self.rng.below(6) == 0 },
            75..=86 => Op::Retry { writer },
            87..=91 => Op::Delete { writer },
            _ => Op::Crash { writer },
        }
    }

    async fn apply(&mut self, op: Op, what: &str) {
        match op {
            Op::TakeOver { writer, stale_local_copy } => self.take_over(writer, stale_local_copy, what).await,
            Op::Write { writer, ack_lost } => self.write(writer, ack_lost, what).await,
            Op::Retry { writer } => self.retry(writer, what).await,
            Op::Delete { writer } => self.delete(writer, what).await,
            Op::Crash { writer } => self.writers[writer] = Writer::default(),
        }
    }

    async fn take_over(&mut self, w: usize, stale_local_copy: bool, what: &str) {
        let epoch = self.newest_epoch + 1;
        self.store.claim(&self.tenant, epoch).await.unwrap_or_else(|e| panic!("{what}: claim of epoch {epoch}: {e:?}"));
        self.newest_epoch = epoch;
        let stored = match self.store.read(&self.tenant).await {
            Ok(s) => s,
            Err(StoreError::NotFound) => CredentialSnapshot::default(),
            Err(e) => panic!("{what}: read after the claim: {e:?}"),
        };
        let me = &mut self.writers[w];
        // A writer that resumes from its own older working copy numbers its batches from there: the store must
        // still order them after everything of older epochs.
        let from = if stale_local_copy { me.next_generation.min(stored.generation) } else { stored.generation };
        *me = Writer { epoch: Some(epoch), next_generation: from + 1, view: stored, unacknowledged: None, written: 0 };
    }

    async fn write(&mut self, w: usize, ack_lost: bool, what: &str) {
        let Some(epoch) = self.writers[w].epoch else { return };
        let me = &mut self.writers[w];
        me.written += 1;
        let own = RecordChange {
            key: RecordKey::new(RecordKind::Session, format!("w{w}-e{epoch}-{}.0", me.written)),
            value: Some(format!("w{w} epoch {epoch} write {}", me.written).into_bytes()),
        };
        let shared = RecordChange {
            key: RecordKey::new(RecordKind::Identity, "shared.0"),
            value: (!me.written.is_multiple_of(3)).then(|| format!("w{w}-e{epoch}-{}", me.written).into_bytes()),
        };
        let batch = ChangeBatch { generation: me.next_generation, epoch, changes: vec![own, shared] };
        me.next_generation += 1;
        let result = self.store.write(&self.tenant, &batch).await;
        self.judge_write(w, &batch, result, what);
        if ack_lost && self.writers[w].epoch == Some(epoch) {
            self.writers[w].unacknowledged = Some(batch);
        }
    }

    /// A write is acknowledged exactly when the writer's epoch is the newest claimed; a refusal is
    /// `StaleEpoch` naming it.
    fn judge_write(&mut self, w: usize, batch: &ChangeBatch, result: Result<(), StoreError>, what: &str) {
        let fenced = batch.epoch < self.newest_epoch;
        match result {
            Ok(()) if fenced => panic!(
                "{what}: a batch of epoch {} was acknowledged after epoch {} was claimed",
                batch.epoch, self.newest_epoch
            ),
            Ok(()) => {
                let mut next = self.model.take().unwrap_or_default();
                next.apply(&batch.changes);
                next.generation = batch.generation;
                self.model = Some(next);
                self.writers[w].view.apply(&batch.changes);
            }
            Err(StoreError::Conflict(Conflict::StaleEpoch { presented, current }))
                if fenced && presented == batch.epoch && current >= self.newest_epoch => {}
            Err(e) => panic!("{what}: batch of epoch {} (newest {}): {e:?}", batch.epoch, self.newest_epoch),
        }
    }

    async fn retry(&mut self, w: usize, what: &str) {
        let Some(batch) = self.writers[w].unacknowledged.take() else { return };
        let fenced = batch.epoch < self.newest_epoch;
        let before = self.stored(what).await;
        match self.store.write(&self.tenant, &batch).await {
            Ok(()) if fenced => panic!("{what}: a retry of fenced epoch {} was acknowledged", batch.epoch),
            Ok(()) => {}
            Err(StoreError::Conflict(Conflict::StaleEpoch { .. })) if fenced => {}
            Err(e) => panic!("{what}: retry of epoch {} (newest {}): {e:?}", batch.epoch, self.newest_epoch),
        }
        let after = self.stored(what).await;
        assert!(before == after, "{what}: a retried batch changed the stored snapshot");
    }

    async fn delete(&mut self, w: usize, what: &str) {
        let Some(epoch) = self.writers[w].epoch else { return };
        let fenced = epoch < self.newest_epoch;
        match self.store.delete(&self.tenant, epoch).await {
            Ok(()) if fenced => panic!("{what}: a delete of fenced epoch {epoch} was acknowledged"),
            Ok(()) => {
                self.model = None;
                // The deleting holder starts again from nothing (a re-link) under the same lease.
                let me = &mut self.writers[w];
                me.view = CredentialSnapshot::default();
                me.unacknowledged = None;
            }
            Err(StoreError::Conflict(Conflict::StaleEpoch { .. })) if fenced => {}
            Err(e) => panic!("{what}: delete of epoch {epoch} (newest {}): {e:?}", self.newest_epoch),
        }
    }

    async fn stored(&self, what: &str) -> Option<CredentialSnapshot> {
        match self.store.read(&self.tenant).await {
            Ok(s) => Some(s),
            Err(StoreError::NotFound) => None,
            Err(e) => panic!("{what}: read: {e:?}"),
        }
    }

    /// The store holds exactly the model; the current holder's view is what is stored.
    async fn check(&self, what: &str) {
        let stored = self.stored(what).await;
        match (&stored, &self.model) {
            (None, None) => {}
            (Some(got), Some(want)) => assert_snapshot_eq(got, want, what),
            (got, want) => panic!(
                "{what}: stored {:?} records, the acknowledged writes make {:?}",
                got.as_ref().map(|s| s.records.len()),
                want.as_ref().map(|s| s.records.len())
            ),
        }
        let holder = self.writers.iter().find(|w| w.epoch == Some(self.newest_epoch));
        if let (Some(holder), Some(got)) = (holder, &stored) {
            assert!(holder.view.records == got.records, "{what}: the holder's acknowledged writes are not all stored");
        }
    }
}

/// A small seeded generator (SplitMix64): the same seed, the same run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
