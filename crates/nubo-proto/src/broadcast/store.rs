//! The messages a node has delivered, kept for a retention window: to recognise duplicates, to
//! answer grafts and to compare digests in anti-entropy.

use core::time::Duration;
use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::{BucketDigest, DIGEST_BUCKETS, Gossip, MessageId};
use crate::id::NodeId;
use crate::time::Time;

#[derive(Clone, Debug)]
struct Stored {
    born: Time,
    hops: u16,
    /// Dropped after the retention window; the id stays to recognise late duplicates.
    payload: Option<Bytes>,
}

/// What one remembered message costs besides its payload (its entries in both indexes), as
/// the byte bound counts it.
pub const ENTRY_BYTES: usize = 160;

/// Delivered messages by id and by birth time, bounded in count, in bytes and in age.
///
/// Payloads live `retention` after their birth, ids twice as long; at most `capacity` ids and
/// `bytes_max` bytes (payloads plus [`ENTRY_BYTES`] each) are kept, the oldest forgotten
/// first.
#[derive(Clone, Debug)]
pub struct MessageStore {
    by_id: BTreeMap<MessageId, Stored>,
    /// Sorted by birth; messages arrive nearly in that order, so a queue holds them without
    /// a map's per-entry nodes.
    by_born: VecDeque<(Time, MessageId)>,
    retention: Duration,
    capacity: usize,
    bytes_max: usize,
    bytes: usize,
}

const MIN_ID: MessageId = MessageId {
    origin: NodeId(0),
    seq: 0,
};
const MAX_ID: MessageId = MessageId {
    origin: NodeId(u128::MAX),
    seq: u64::MAX,
};

impl MessageStore {
    /// An empty store.
    pub fn new(retention: Duration, capacity: usize, bytes_max: usize) -> MessageStore {
        MessageStore {
            by_id: BTreeMap::new(),
            by_born: VecDeque::new(),
            retention,
            capacity,
            bytes_max,
            bytes: 0,
        }
    }

    /// Bytes counted against the bound.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn forget_oldest(&mut self) -> bool {
        let Some((_, oldest)) = self.by_born.pop_front() else {
            return false;
        };
        if let Some(stored) = self.by_id.remove(&oldest) {
            self.bytes = self
                .bytes
                .saturating_sub(ENTRY_BYTES + stored.payload.map_or(0, |p| p.len()));
        }
        true
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether `id` was delivered and is still remembered.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.by_id.contains_key(id)
    }

    /// Remembers a delivered message.
    pub fn insert(&mut self, gossip: &Gossip) {
        let stored = Stored {
            born: gossip.born,
            hops: gossip.hops,
            payload: Some(gossip.payload.clone()),
        };
        let size = ENTRY_BYTES + gossip.payload.len();
        match self.by_id.insert(gossip.id, stored) {
            None => {
                let entry = (gossip.born, gossip.id);
                let at = self.by_born.partition_point(|e| *e < entry);
                self.by_born.insert(at, entry);
                self.bytes += size;
            }
            Some(old) => {
                self.bytes = self
                    .bytes
                    .saturating_sub(ENTRY_BYTES + old.payload.map_or(0, |p| p.len()))
                    + size;
            }
        }
        while (self.by_id.len() > self.capacity || self.bytes > self.bytes_max)
            && self.forget_oldest()
        {}
    }

    /// The message as we would send it on: one more hop, if its payload is still kept.
    pub fn forwardable(&self, id: &MessageId) -> Option<Gossip> {
        let stored = self.by_id.get(id)?;
        Some(Gossip {
            id: *id,
            born: stored.born,
            hops: stored.hops.saturating_add(1),
            payload: stored.payload.clone()?,
        })
    }

    /// Whether a message born at `born` is young enough to be deduplicated reliably.
    pub fn is_recent(&self, now: Time, born: Time) -> bool {
        born >= now.saturating_sub(self.retention.saturating_mul(2))
    }

    /// Drops payloads older than the retention window and ids older than twice that.
    pub fn expire(&mut self, now: Time) {
        let forget_before = now.saturating_sub(self.retention.saturating_mul(2));
        while self
            .by_born
            .front()
            .is_some_and(|&(born, _)| born < forget_before)
        {
            self.forget_oldest();
        }
        let drop_payload_before = now.saturating_sub(self.retention);
        let end = self
            .by_born
            .partition_point(|e| *e < (drop_payload_before, MIN_ID));
        for (_, id) in self.by_born.range(..end) {
            if let Some(stored) = self.by_id.get_mut(id)
                && let Some(payload) = stored.payload.take()
            {
                self.bytes = self.bytes.saturating_sub(payload.len());
            }
        }
    }

    /// Count and XOR hash, per bucket, of the ids born in `[start, end]`.
    pub fn digest(&self, start: Time, end: Time) -> [BucketDigest; DIGEST_BUCKETS] {
        let mut buckets = [BucketDigest::default(); DIGEST_BUCKETS];
        for id in self.born_between(start, end) {
            let bucket = &mut buckets[bucket_of(id)];
            bucket.count = bucket.count.wrapping_add(1);
            bucket.hash ^= id.hash64();
        }
        buckets
    }

    /// Ids born in `[start, end]` whose bucket is flagged in `buckets` and whose payload is
    /// still kept, at most `limit` of them, starting at the `skip`-th (modulo their number)
    /// and wrapping around: a caller that moves `skip` on lists them all over its calls, however
    /// many there are.
    pub fn ids_in_buckets(
        &self,
        start: Time,
        end: Time,
        buckets: &[bool; DIGEST_BUCKETS],
        limit: usize,
        skip: usize,
    ) -> Vec<MessageId> {
        let candidates = || {
            self.born_between(start, end)
                .filter(|id| buckets[bucket_of(id)])
                .filter(|id| self.by_id.get(id).is_some_and(|s| s.payload.is_some()))
        };
        let total = candidates().count();
        if total == 0 {
            return Vec::new();
        }
        let first = skip % total;
        candidates()
            .skip(first)
            .chain(candidates().take(first))
            .take(limit)
            .copied()
            .collect()
    }

    /// The newest messages born at or after `since` whose payload is kept, at most `limit`,
    /// with the hops they had here.
    pub fn born_since(&self, since: Time, limit: usize) -> Vec<(MessageId, u16)> {
        let from = self.by_born.partition_point(|e| *e < (since, MIN_ID));
        self.by_born
            .range(from..)
            .rev()
            .filter_map(|(_, id)| {
                let stored = self.by_id.get(id)?;
                stored.payload.as_ref().map(|_| (*id, stored.hops))
            })
            .take(limit)
            .collect()
    }

    fn born_between(&self, start: Time, end: Time) -> impl Iterator<Item = &MessageId> + '_ {
        let from = self.by_born.partition_point(|e| *e < (start, MIN_ID));
        let to = self.by_born.partition_point(|e| *e <= (end, MAX_ID));
        let range = (start <= end && from < to).then(|| self.by_born.range(from..to));
        range.into_iter().flatten().map(|(_, id)| id)
    }
}

fn bucket_of(id: &MessageId) -> usize {
    (id.hash64() % DIGEST_BUCKETS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gossip(seq: u64, born_ms: u64) -> Gossip {
        Gossip {
            id: MessageId {
                origin: NodeId(1),
                seq,
            },
            born: Time::from_millis(born_ms),
            hops: 2,
            payload: Bytes::from_static(b"x"),
        }
    }

    #[test]
    fn capacity_forgets_the_oldest_first() {
        let mut store = MessageStore::new(Duration::from_secs(60), 2, usize::MAX);
        store.insert(&gossip(1, 30));
        store.insert(&gossip(2, 10));
        store.insert(&gossip(3, 20));
        assert!(!store.contains(&gossip(2, 0).id));
        assert!(store.contains(&gossip(1, 0).id) && store.contains(&gossip(3, 0).id));
    }

    #[test]
    fn bytes_bound_forgets_the_oldest_and_expired_payloads_stop_counting() {
        let mut store = MessageStore::new(Duration::from_secs(60), 100, 3 * (ENTRY_BYTES + 1));
        for (seq, born) in [(1, 30), (2, 10), (3, 20), (4, 40)] {
            store.insert(&gossip(seq, born));
        }
        assert!(!store.contains(&gossip(2, 0).id), "the oldest went first");
        assert_eq!(store.len(), 3);
        assert_eq!(store.bytes(), 3 * (ENTRY_BYTES + 1));
        store.expire(Time::from_secs(61));
        assert_eq!(
            store.bytes(),
            3 * ENTRY_BYTES,
            "payloads past retention dropped"
        );
        store.expire(Time::from_secs(121));
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[test]
    fn digests_differ_exactly_in_the_buckets_of_missing_ids() {
        let mut full = MessageStore::new(Duration::from_secs(60), 100, usize::MAX);
        let mut partial = MessageStore::new(Duration::from_secs(60), 100, usize::MAX);
        for seq in 0..20 {
            full.insert(&gossip(seq, 1_000));
            if seq != 7 {
                partial.insert(&gossip(seq, 1_000));
            }
        }
        let (start, end) = (Time::ZERO, Time::from_millis(2_000));
        let a = full.digest(start, end);
        let b = partial.digest(start, end);
        let differing: Vec<usize> = (0..DIGEST_BUCKETS).filter(|&i| a[i] != b[i]).collect();
        assert_eq!(differing, vec![bucket_of(&gossip(7, 0).id)]);
        let mut flags = [false; DIGEST_BUCKETS];
        flags[differing[0]] = true;
        let listed = full.ids_in_buckets(start, end, &flags, 10, 0);
        assert!(listed.contains(&gossip(7, 0).id));
        // A window that excludes the birth time sees nothing.
        assert_eq!(
            full.digest(Time::from_millis(1_001), end),
            [BucketDigest::default(); DIGEST_BUCKETS]
        );
        assert_eq!(
            full.digest(end, start),
            [BucketDigest::default(); DIGEST_BUCKETS]
        );
    }
}
