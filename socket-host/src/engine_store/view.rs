//! The in-memory view of one tenant's records: small values inline, the others (and every pre-key) only by
//! where they are in the working copy.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use wakeeper_shared::domain::{RecordKey, RecordKind};
use wakeeper_shared::local::{RecordLoc, WorkingCopy, WorkingCopyError};
use whatsapp_rust::wacore::store::traits::LidPnMappingEntry;

use super::INLINE_MAX;
use super::codec::leading_timestamp;

/// Where one record's value is.
#[derive(Debug)]
pub(super) enum Slot {
    Inline(Box<[u8]>),
    /// On disk; `timestamp` caches the leading timestamp of the kinds swept by age (0 for the others).
    Disk {
        loc: RecordLoc,
        timestamp: i64,
    },
}

impl Slot {
    /// The leading timestamp of a value of a kind swept by age (see [`swept_by_age`]).
    pub(super) fn timestamp(&self) -> i64 {
        match self {
            Slot::Inline(b) => leading_timestamp(b),
            Slot::Disk { timestamp, .. } => *timestamp,
        }
    }
}

const KINDS: usize = RecordKind::ALL.len();

fn kind_index(kind: RecordKind) -> usize {
    RecordKind::ALL.iter().position(|k| *k == kind).expect("every kind is in ALL")
}

/// Kinds whose value starts with an i64 that sweeps filter on.
fn swept_by_age(kind: RecordKind) -> bool {
    matches!(kind, RecordKind::SentMessage | RecordKind::PendingInbound | RecordKind::MsgSecret)
}

/// The in-memory view.
#[derive(Default)]
pub(super) struct State {
    /// One map per kind (pre-keys excepted), keyed by the record key.
    pub(super) maps: [BTreeMap<Box<str>, Slot>; KINDS],
    /// Pre-key ids and where their records are, sorted by id.
    pub(super) prekeys: Vec<(u32, RecordLoc)>,
    /// Phone user -> LID user of the newest mapping, for `get_pn_mapping`.
    pub(super) pn_to_lid: HashMap<Box<str>, Box<str>>,
}

impl State {
    /// Reads the whole working copy (base and journal, in write order).
    pub(super) fn scan(wc: &WorkingCopy) -> Result<State, WorkingCopyError> {
        let mut state = State::default();
        wc.scan(|item| state.apply(&item.key, item.value, item.loc))?;
        Ok(state)
    }

    pub(super) fn map(&self, kind: RecordKind) -> &BTreeMap<Box<str>, Slot> {
        &self.maps[kind_index(kind)]
    }

    fn map_mut(&mut self, kind: RecordKind) -> &mut BTreeMap<Box<str>, Slot> {
        &mut self.maps[kind_index(kind)]
    }

    /// The records of `kind` whose key starts with `prefix`, in key order.
    pub(super) fn with_prefix<'a>(
        &'a self,
        kind: RecordKind,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a Box<str>, &'a Slot)> + 'a {
        self.map(kind)
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// Whether a pre-key with this id is held.
    pub(super) fn has_prekey(&self, id: u32) -> bool {
        self.prekey_at(id).is_ok()
    }

    /// The pre-key's index in `prekeys`, or where it would go.
    pub(super) fn prekey_at(&self, id: u32) -> Result<usize, usize> {
        self.prekeys.binary_search_by_key(&id, |(i, _)| *i)
    }

    /// Applies one durable change (`value` `None`: a deletion) now at `loc`.
    pub(super) fn apply(&mut self, key: &RecordKey, value: Option<Vec<u8>>, loc: RecordLoc) {
        match value {
            Some(v) => {
                if key.kind == RecordKind::LidMapping {
                    self.index_lid(&key.key, &v);
                }
                self.put(key, v, loc);
            }
            None => self.remove(key),
        }
    }

    fn put(&mut self, key: &RecordKey, value: Vec<u8>, loc: RecordLoc) {
        if key.kind == RecordKind::PreKey {
            if let Ok(id) = key.key.parse::<u32>() {
                match self.prekey_at(id) {
                    Ok(at) => self.prekeys[at].1 = loc,
                    Err(at) => self.prekeys.insert(at, (id, loc)),
                }
            }
            return;
        }
        let slot = if value.len() <= INLINE_MAX {
            Slot::Inline(value.into_boxed_slice())
        } else {
            let timestamp = if swept_by_age(key.kind) { leading_timestamp(&value) } else { 0 };
            Slot::Disk { loc, timestamp }
        };
        self.map_mut(key.kind).insert(key.key.as_str().into(), slot);
    }

    fn remove(&mut self, key: &RecordKey) {
        if key.kind == RecordKind::PreKey {
            if let Ok(id) = key.key.parse::<u32>()
                && let Ok(at) = self.prekey_at(id)
            {
                self.prekeys.remove(at);
            }
            return;
        }
        self.map_mut(key.kind).remove(key.key.as_str());
    }

    /// Points the mapping's phone at `lid` (the newest write wins, as replay preserves write order). An entry
    /// left behind when a LID moves to another phone is filtered out on lookup.
    fn index_lid(&mut self, lid: &str, value: &[u8]) {
        if let Ok(e) = serde_json::from_slice::<LidPnMappingEntry>(value) {
            self.pn_to_lid.insert(e.phone_number.into_boxed_str(), lid.into());
        }
    }

    /// Records held, pre-keys included.
    pub(super) fn records(&self) -> u64 {
        self.maps.iter().map(|m| m.len() as u64).sum::<u64>() + self.prekeys.len() as u64
    }

    pub(super) fn approx_bytes(&self) -> u64 {
        let mut n = std::mem::size_of::<Self>() + self.prekeys.capacity() * std::mem::size_of::<(u32, RecordLoc)>();
        for m in &self.maps {
            for (k, v) in m {
                n += 64 + k.len();
                if let Slot::Inline(b) = v {
                    n += b.len();
                }
            }
        }
        for (k, v) in &self.pn_to_lid {
            n += 64 + k.len() + v.len();
        }
        n as u64
    }
}
