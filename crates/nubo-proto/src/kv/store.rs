//! The records one node holds, ordered by ring position, within a byte budget.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::blob;
use crate::kv::version::Version;
use crate::ring::{Position, distance};
use crate::time::Time;

/// Bytes a record costs beyond its key and value (version, bookkeeping), for budgets.
pub const RECORD_OVERHEAD: usize = 64;

/// The ring position of a key: the first 128 bits of its BLAKE3 hash.
pub fn key_position(key: &[u8]) -> Position {
    let hash = blake3::hash(key);
    let mut first = [0u8; 16];
    first.copy_from_slice(&hash.as_bytes()[..16]);
    u128::from_be_bytes(first)
}

/// A key's value at a version; a tombstone (deleted key) has no value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The key.
    pub key: Bytes,
    /// When and by whom it was written.
    pub version: Version,
    /// The value, `None` for a delete.
    pub value: Option<Bytes>,
}

impl Record {
    /// Bytes the record costs in a store.
    pub fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Bytes::len) + RECORD_OVERHEAD
    }

    /// Whether the value is what the key promises: content-addressed keys
    /// ([`blob::is_content_key`]) must hash to their value. Other keys promise nothing.
    pub fn is_intact(&self) -> bool {
        match &self.value {
            Some(value) => blob::verify(&self.key, value),
            None => !blob::is_content_key(&self.key),
        }
    }
}

/// What applying a record did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The key was new here.
    New,
    /// It replaced an older version.
    Replaced,
    /// This node already had this version or a newer one; nothing changed.
    Stale,
}

/// Why a record was refused. Nothing stored is ever dropped to make room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StoreError {
    /// Storing it would exceed the node owner's storage budget.
    #[error("the replica's storage budget of {budget} bytes is full")]
    Full {
        /// The budget.
        budget: u64,
    },
    /// A content-addressed key whose value does not hash to it.
    #[error("the value does not match its content-addressed key")]
    Corrupt,
    /// The replica could not save it to disk (its disk may be full).
    #[error("the replica could not save it to disk (its disk may be full)")]
    NotSaved,
}

/// A summary of the records in one slice of a range, for anti-entropy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Records in the slice.
    pub count: u32,
    /// Wrapping sum of their `(key, version)` fingerprints.
    pub sum: u64,
}

#[derive(Clone, Debug)]
struct Entry {
    version: Version,
    value: Option<Bytes>,
    fingerprint: u64,
    /// When this node stored this version (tombstones are collected some time after).
    stored: Time,
}

/// The records held by one node, keyed by `(ring position, key)`.
///
/// Contract: `bytes()` never exceeds `budget()` through [`Store::apply`]; a record is replaced
/// only by a newer version of itself; content-addressed records are checked before storing.
#[derive(Clone, Debug)]
pub struct Store {
    entries: BTreeMap<(Position, Bytes), Entry>,
    bytes: usize,
    budget: usize,
    /// Keys changed since the last [`Store::drain_changed`], when tracking is on.
    changed: Option<BTreeSet<Bytes>>,
}

impl Store {
    /// An empty store that holds at most `budget` bytes.
    pub fn new(budget: usize) -> Store {
        Store {
            entries: BTreeMap::new(),
            bytes: 0,
            budget,
            changed: None,
        }
    }

    /// Starts remembering which keys change, for a driver that keeps the store on disk.
    pub fn track_changes(&mut self) {
        self.changed.get_or_insert_with(BTreeSet::new);
    }

    /// Keys stored, replaced or removed since the last call (none unless tracking is on). The
    /// set grows until drained: a driver that tracks changes drains after every input.
    pub fn drain_changed(&mut self) -> Vec<Bytes> {
        self.changed
            .as_mut()
            .map(|changed| std::mem::take(changed).into_iter().collect())
            .unwrap_or_default()
    }

    fn note_changed(&mut self, key: &Bytes) {
        if let Some(changed) = &mut self.changed {
            changed.insert(key.clone());
        }
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held (as [`Record::size`] counts them).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The most bytes this store holds.
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Stores `record` unless a version at least as new is here.
    pub fn apply(&mut self, now: Time, record: &Record) -> Result<Applied, StoreError> {
        if !record.is_intact() {
            return Err(StoreError::Corrupt);
        }
        let slot = (key_position(&record.key), record.key.clone());
        let old_size = match self.entries.get(&slot) {
            Some(entry) if entry.version >= record.version => return Ok(Applied::Stale),
            Some(entry) => {
                record.key.len() + entry.value.as_ref().map_or(0, Bytes::len) + RECORD_OVERHEAD
            }
            None => 0,
        };
        let new_bytes = self.bytes - old_size + record.size();
        if new_bytes > self.budget && record.size() > old_size {
            return Err(StoreError::Full {
                budget: self.budget as u64,
            });
        }
        self.bytes = new_bytes;
        let entry = Entry {
            version: record.version,
            value: record.value.clone(),
            fingerprint: record.version.fingerprint(&record.key),
            stored: now,
        };
        self.note_changed(&record.key);
        Ok(match self.entries.insert(slot, entry) {
            Some(_) => Applied::Replaced,
            None => Applied::New,
        })
    }

    /// The record of `key`, tombstone included.
    pub fn get(&self, key: &[u8]) -> Option<Record> {
        let slot = (key_position(key), Bytes::copy_from_slice(key));
        self.entries.get(&slot).map(|entry| Record {
            key: slot.1.clone(),
            version: entry.version,
            value: entry.value.clone(),
        })
    }

    /// The version held of `key`.
    pub fn version(&self, key: &[u8]) -> Option<Version> {
        let slot = (key_position(key), Bytes::copy_from_slice(key));
        self.entries.get(&slot).map(|entry| entry.version)
    }

    /// Removes `key` if it is still at `version` (it was handed to its replicas). Returns
    /// whether it was removed.
    pub fn remove_if_at(&mut self, key: &Bytes, version: Version) -> bool {
        let slot = (key_position(key), key.clone());
        match self.entries.get(&slot) {
            Some(entry) if entry.version == version => {
                let size = key.len() + entry.value.as_ref().map_or(0, Bytes::len) + RECORD_OVERHEAD;
                self.entries.remove(&slot);
                self.bytes -= size;
                self.note_changed(key);
                true
            }
            _ => false,
        }
    }

    /// Keys and versions with positions in `(lo, hi]` (all of the ring if `lo == hi`), in ring
    /// order from `lo`.
    pub fn range(
        &self,
        lo: Position,
        hi: Position,
    ) -> impl Iterator<Item = (Position, &Bytes, Version)> {
        spans(lo, hi)
            .into_iter()
            .flatten()
            .flat_map(move |(start, end)| {
                self.entries
                    .range((start, Bytes::new())..)
                    .take_while(move |((p, _), _)| *p <= end)
                    .map(|((p, key), entry)| (*p, key, entry.version))
            })
    }

    /// Records with positions in `(lo, hi]` (see [`Store::range`]).
    pub fn records(&self, lo: Position, hi: Position) -> impl Iterator<Item = Record> + '_ {
        self.range(lo, hi).filter_map(|(_, key, _)| self.get(key))
    }

    /// Summaries of `(lo, hi]` cut into `count` equal slices.
    pub fn buckets(&self, lo: Position, hi: Position, count: usize) -> Vec<Bucket> {
        let mut buckets = vec![Bucket::default(); count];
        for ((position, _), entry) in
            spans(lo, hi)
                .into_iter()
                .flatten()
                .flat_map(|(start, end)| {
                    self.entries
                        .range((start, Bytes::new())..)
                        .take_while(move |((p, _), _)| *p <= end)
                })
        {
            let bucket = &mut buckets[bucket_of(lo, hi, count, *position)];
            bucket.count += 1;
            bucket.sum = bucket.sum.wrapping_add(entry.fingerprint);
        }
        buckets
    }

    /// Drops tombstones stored more than `ttl` ago; returns how many.
    pub fn collect_tombstones(&mut self, now: Time, ttl: Duration) -> usize {
        let oldest = now.saturating_sub(ttl);
        let before = self.entries.len();
        let mut freed = 0;
        let changed = &mut self.changed;
        self.entries.retain(|(_, key), entry| {
            let keep = entry.value.is_some() || entry.stored >= oldest;
            if !keep {
                freed += key.len() + RECORD_OVERHEAD;
                if let Some(changed) = changed.as_mut() {
                    changed.insert(key.clone());
                }
            }
            keep
        });
        self.bytes -= freed;
        before - self.entries.len()
    }

    /// Up to `max` keys and versions at or after `from` (wrapping once round the ring), for
    /// scans that proceed a little every cycle.
    pub fn scan_from(&self, from: Position, max: usize) -> Vec<(Position, Bytes, Version)> {
        self.entries
            .range((from, Bytes::new())..)
            .chain(self.entries.range(..(from, Bytes::new())))
            .take(max)
            .map(|((p, key), entry)| (*p, key.clone(), entry.version))
            .collect()
    }
}

/// The inclusive position spans making up `(lo, hi]`.
fn spans(lo: Position, hi: Position) -> [Option<(Position, Position)>; 2] {
    if lo == hi {
        [Some((0, Position::MAX)), None]
    } else if lo < hi {
        [Some((lo + 1, hi)), None]
    } else if lo == Position::MAX {
        [Some((0, hi)), None]
    } else {
        [Some((lo + 1, Position::MAX)), Some((0, hi))]
    }
}

/// Which of `count` equal slices of `(lo, hi]` holds `position`.
pub fn bucket_of(lo: Position, hi: Position, count: usize, position: Position) -> usize {
    let span = match distance(lo, hi) {
        0 => Position::MAX,
        span => span,
    };
    let width = (span / count as u128).max(1);
    let offset = distance(lo, position).wrapping_sub(1);
    ((offset / width) as usize).min(count - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::NodeId;

    fn version(millis: u64) -> Version {
        Version {
            millis,
            counter: 0,
            writer: NodeId(1),
        }
    }

    fn record(key: &str, millis: u64, value: Option<&str>) -> Record {
        Record {
            key: Bytes::copy_from_slice(key.as_bytes()),
            version: version(millis),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
        }
    }

    #[test]
    fn tracked_changes_name_each_key_once_until_drained() {
        let mut store = Store::new(1 << 20);
        store.apply(Time::ZERO, &record("a", 1, Some("x"))).unwrap();
        assert!(store.drain_changed().is_empty(), "untracked by default");
        store.track_changes();
        store.apply(Time::ZERO, &record("b", 1, Some("x"))).unwrap();
        store.apply(Time::ZERO, &record("b", 2, Some("y"))).unwrap();
        store.apply(Time::ZERO, &record("c", 1, None)).unwrap();
        store.apply(Time::ZERO, &record("a", 1, Some("x"))).unwrap(); // stale: no change
        assert_eq!(
            store.drain_changed(),
            vec![Bytes::from("b"), Bytes::from("c")]
        );
        assert!(store.remove_if_at(&Bytes::from("b"), version(2)));
        store.collect_tombstones(Time::from_secs(10), Duration::from_secs(1));
        assert_eq!(
            store.drain_changed(),
            vec![Bytes::from("b"), Bytes::from("c")]
        );
        assert!(store.drain_changed().is_empty());
    }

    #[test]
    fn last_writer_wins_whatever_the_order() {
        let mut a = Store::new(1 << 20);
        let mut b = Store::new(1 << 20);
        let old = record("k", 1, Some("old"));
        let new = record("k", 2, Some("new"));
        assert_eq!(a.apply(Time::ZERO, &old), Ok(Applied::New));
        assert_eq!(a.apply(Time::ZERO, &new), Ok(Applied::Replaced));
        assert_eq!(b.apply(Time::ZERO, &new), Ok(Applied::New));
        assert_eq!(b.apply(Time::ZERO, &old), Ok(Applied::Stale));
        assert_eq!(a.get(b"k"), Some(new.clone()));
        assert_eq!(b.get(b"k"), Some(new));
        assert_eq!(a.buckets(0, 0, 4), b.buckets(0, 0, 4));
        assert_eq!(a.bytes(), b.bytes());
    }

    #[test]
    fn a_full_store_refuses_and_keeps_what_it_has() {
        let first = record("a", 1, Some("0123456789"));
        let mut store = Store::new(first.size() + 5);
        assert_eq!(store.apply(Time::ZERO, &first), Ok(Applied::New));
        let second = record("b", 1, Some("x"));
        assert_eq!(
            store.apply(Time::ZERO, &second),
            Err(StoreError::Full {
                budget: (first.size() + 5) as u64
            })
        );
        assert_eq!(store.get(b"a"), Some(first));
        // A smaller newer version (a delete) always fits.
        assert_eq!(
            store.apply(Time::ZERO, &record("a", 2, None)),
            Ok(Applied::Replaced)
        );
        assert_eq!(store.bytes(), record("a", 2, None).size());
    }

    #[test]
    fn tombstones_are_collected_after_their_ttl() {
        let mut store = Store::new(1 << 20);
        store
            .apply(Time::from_secs(1), &record("gone", 1, None))
            .unwrap();
        store
            .apply(Time::from_secs(1), &record("kept", 1, Some("v")))
            .unwrap();
        assert_eq!(
            store.collect_tombstones(Time::from_secs(50), Duration::from_secs(60)),
            0
        );
        assert_eq!(
            store.collect_tombstones(Time::from_secs(62), Duration::from_secs(60)),
            1
        );
        assert_eq!(store.get(b"gone"), None);
        assert!(store.get(b"kept").is_some());
        assert_eq!(store.bytes(), record("kept", 1, Some("v")).size());
    }

    #[test]
    fn ranges_wrap_around_the_ring() {
        let mut store = Store::new(1 << 20);
        let keys: Vec<String> = (0..50).map(|i| format!("key{i}")).collect();
        for key in &keys {
            store.apply(Time::ZERO, &record(key, 1, Some("v"))).unwrap();
        }
        let lo = key_position(b"key7");
        let hi = key_position(b"key3");
        let inside = store.range(lo, hi).count();
        let outside = store.range(hi, lo).count();
        assert_eq!(inside + outside, 50);
        assert_eq!(store.range(lo, lo).count(), 50);
        assert!(
            store
                .range(lo, hi)
                .all(|(p, _, _)| crate::ring::in_interval(p, lo, hi))
        );
        let buckets = store.buckets(lo, hi, 8);
        assert_eq!(
            buckets.iter().map(|b| b.count as usize).sum::<usize>(),
            inside
        );
    }

    #[test]
    fn buckets_cover_their_range_evenly() {
        assert_eq!(bucket_of(0, 100, 4, 1), 0);
        assert_eq!(bucket_of(0, 100, 4, 100), 3);
        assert_eq!(bucket_of(0, 0, 4, Position::MAX), 3);
        assert_eq!(bucket_of(0, 0, 4, 1), 0);
        assert_eq!(bucket_of(Position::MAX - 9, 10, 2, 0), 0);
        assert_eq!(bucket_of(Position::MAX - 9, 10, 2, 10), 1);
        assert_eq!(bucket_of(7, 7, 1, 3), 0);
        assert_eq!(bucket_of(7, 7, 1, 7), 0);
    }

    #[test]
    fn removal_is_conditional_on_the_version() {
        let mut store = Store::new(1 << 20);
        store.apply(Time::ZERO, &record("k", 2, Some("v"))).unwrap();
        assert!(!store.remove_if_at(&Bytes::from_static(b"k"), version(1)));
        assert!(store.remove_if_at(&Bytes::from_static(b"k"), version(2)));
        assert!(store.is_empty());
        assert_eq!(store.bytes(), 0);
    }
}
