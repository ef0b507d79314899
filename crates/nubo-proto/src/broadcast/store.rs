//! The messages a node has delivered, kept for a retention window: to recognise duplicates, to
//! answer grafts and to compare digests in anti-entropy.

use core::time::Duration;
use std::collections::BTreeMap;

use bytes::Bytes;

use super::{BucketDigest, DIGEST_BUCKETS, Gossip, MessageId};
use crate::id::NodeId;
use crate::time::Time;

/// A [`MessageId`] packed without the 16-byte alignment of its `u128` origin (24 bytes, not
/// 32), ordered alike: every node of a large cloud keeps one per message of the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    origin_high: u64,
    origin_low: u64,
    seq: u64,
}

impl From<&MessageId> for Key {
    fn from(id: &MessageId) -> Key {
        Key {
            origin_high: (id.origin.0 >> 64) as u64,
            origin_low: id.origin.0 as u64,
            seq: id.seq,
        }
    }
}

impl From<&Key> for MessageId {
    fn from(key: &Key) -> MessageId {
        MessageId {
            origin: NodeId((u128::from(key.origin_high) << 64) | u128::from(key.origin_low)),
            seq: key.seq,
        }
    }
}

#[derive(Clone, Debug)]
struct Stored {
    born: Time,
    hops: u16,
    /// Dropped after the retention window; the id stays to recognise late duplicates.
    payload: Option<Bytes>,
}

/// What one remembered message costs besides its payload (its map entry), as the byte bound
/// counts it.
pub const ENTRY_BYTES: usize = 128;

/// How many of the oldest messages one overflow forgets, in eighths of those held: forgetting
/// in batches keeps the cost of finding the oldest (a pass over all) to a few per message.
const FORGET_EIGHTHS: usize = 1;

/// Delivered messages by id, bounded in count, in bytes and in age.
///
/// Payloads live `retention` after their birth, ids twice as long; at most `capacity` ids and
/// `bytes_max` bytes (payloads plus [`ENTRY_BYTES`] each) are kept; past either bound the
/// oldest eighth is forgotten.
///
/// One map, no index by birth: the queries by birth (digests of a window, expiry) pass over
/// every id, a few times per anti-entropy round, which costs less than a second index kept
/// by every node of a large cloud for every message (about a third of the store's memory).
#[derive(Clone, Debug)]
pub struct MessageStore {
    by_id: BTreeMap<Key, Stored>,
    retention: Duration,
    capacity: usize,
    bytes_max: usize,
    bytes: usize,
}

impl MessageStore {
    /// An empty store.
    pub fn new(retention: Duration, capacity: usize, bytes_max: usize) -> MessageStore {
        MessageStore {
            by_id: BTreeMap::new(),
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

    fn cost(stored: &Stored) -> usize {
        ENTRY_BYTES + stored.payload.as_ref().map_or(0, Bytes::len)
    }

    /// Forgets the oldest eighth of the messages (at least one), oldest by birth then id.
    fn forget_oldest(&mut self) {
        let mut ages: Vec<(Time, Key)> = self.by_id.iter().map(|(k, s)| (s.born, *k)).collect();
        if ages.is_empty() {
            return;
        }
        let count = (ages.len() * FORGET_EIGHTHS / 8).max(1);
        let (_, &mut cutoff, _) = ages.select_nth_unstable(count - 1);
        let mut freed = 0;
        self.by_id.retain(|key, stored| {
            let keep = (stored.born, *key) > cutoff;
            if !keep {
                freed += Self::cost(stored);
            }
            keep
        });
        self.bytes = self.bytes.saturating_sub(freed);
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether `id` was delivered and is still remembered.
    pub fn contains(&self, id: &MessageId) -> bool {
        self.by_id.contains_key(&Key::from(id))
    }

    /// Remembers a delivered message.
    pub fn insert(&mut self, gossip: &Gossip) {
        let stored = Stored {
            born: gossip.born,
            hops: gossip.hops,
            payload: Some(gossip.payload.clone()),
        };
        let size = Self::cost(&stored);
        let old = self.by_id.insert(Key::from(&gossip.id), stored);
        self.bytes = self
            .bytes
            .saturating_sub(old.as_ref().map_or(0, Self::cost))
            + size;
        while (self.by_id.len() > self.capacity || self.bytes > self.bytes_max)
            && !self.by_id.is_empty()
        {
            self.forget_oldest();
        }
    }

    /// The message as we would send it on: one more hop, if its payload is still kept.
    pub fn forwardable(&self, id: &MessageId) -> Option<Gossip> {
        let stored = self.by_id.get(&Key::from(id))?;
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
        let drop_payload_before = now.saturating_sub(self.retention);
        let mut freed = 0;
        self.by_id.retain(|_, stored| {
            if stored.born < forget_before {
                freed += Self::cost(stored);
                return false;
            }
            if stored.born < drop_payload_before
                && let Some(payload) = stored.payload.take()
            {
                freed += payload.len();
            }
            true
        });
        self.bytes = self.bytes.saturating_sub(freed);
    }

    /// Count and XOR hash, per bucket, of the ids born in `[start, end]`.
    pub fn digest(&self, start: Time, end: Time) -> [BucketDigest; DIGEST_BUCKETS] {
        let mut buckets = [BucketDigest::default(); DIGEST_BUCKETS];
        for id in self.born_between(start, end) {
            let bucket = &mut buckets[bucket_of(&id)];
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
        let candidates: Vec<MessageId> = self
            .by_id
            .iter()
            .filter(|(_, s)| s.payload.is_some() && start <= s.born && s.born <= end)
            .map(|(key, _)| MessageId::from(key))
            .filter(|id| buckets[bucket_of(id)])
            .collect();
        if candidates.is_empty() {
            return Vec::new();
        }
        let first = skip % candidates.len();
        candidates[first..]
            .iter()
            .chain(&candidates[..first])
            .take(limit)
            .copied()
            .collect()
    }

    /// The newest messages born at or after `since` whose payload is kept, at most `limit`,
    /// with the hops they had here.
    pub fn born_since(&self, since: Time, limit: usize) -> Vec<(MessageId, u16)> {
        let mut recent: Vec<(Time, Key, u16)> = self
            .by_id
            .iter()
            .filter(|(_, s)| s.born >= since && s.payload.is_some())
            .map(|(key, s)| (s.born, *key, s.hops))
            .collect();
        recent.sort_unstable_by_key(|&(born, key, _)| core::cmp::Reverse((born, key)));
        recent
            .into_iter()
            .take(limit)
            .map(|(_, key, hops)| (MessageId::from(&key), hops))
            .collect()
    }

    fn born_between(&self, start: Time, end: Time) -> impl Iterator<Item = MessageId> + '_ {
        self.by_id
            .iter()
            .filter(move |(_, s)| start <= s.born && s.born <= end)
            .map(|(key, _)| MessageId::from(key))
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
    fn packed_keys_give_back_the_id_and_sort_alike() {
        let ids = [
            MessageId::named(NodeId(u128::MAX), 3),
            MessageId {
                origin: NodeId(1 << 64),
                seq: 0,
            },
            MessageId {
                origin: NodeId((1 << 64) - 1),
                seq: u64::MAX,
            },
            MessageId {
                origin: NodeId(0),
                seq: 9,
            },
        ];
        for a in &ids {
            assert_eq!(MessageId::from(&Key::from(a)), *a);
            for b in &ids {
                assert_eq!(Key::from(a).cmp(&Key::from(b)), a.cmp(b));
            }
        }
    }

    #[test]
    fn an_overflow_forgets_the_oldest_eighth_at_once() {
        let mut store = MessageStore::new(Duration::from_secs(60), 16, usize::MAX);
        for seq in 0..17 {
            store.insert(&gossip(seq, 1_000 + seq));
        }
        assert_eq!(store.len(), 15, "17 held: the two oldest went");
        assert!(!store.contains(&gossip(0, 0).id) && !store.contains(&gossip(1, 0).id));
        assert!(store.contains(&gossip(2, 0).id));
        assert_eq!(store.bytes(), 15 * (ENTRY_BYTES + 1));
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
