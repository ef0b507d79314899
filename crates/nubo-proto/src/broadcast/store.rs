//! The messages a node has delivered, kept for a retention window: to recognise duplicates, to
//! answer grafts and to compare digests in anti-entropy.

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};

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

/// Delivered messages by id and by birth time, bounded in count and in age.
///
/// Payloads live `retention` after their birth, ids twice as long; at most `capacity` ids are
/// kept, the oldest forgotten first.
#[derive(Clone, Debug)]
pub struct MessageStore {
    by_id: BTreeMap<MessageId, Stored>,
    by_born: BTreeSet<(Time, MessageId)>,
    retention: Duration,
    capacity: usize,
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
    pub fn new(retention: Duration, capacity: usize) -> MessageStore {
        MessageStore {
            by_id: BTreeMap::new(),
            by_born: BTreeSet::new(),
            retention,
            capacity,
        }
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
        if self.by_id.insert(gossip.id, stored).is_none() {
            self.by_born.insert((gossip.born, gossip.id));
        }
        while self.by_id.len() > self.capacity {
            let Some((_, oldest)) = self.by_born.pop_first() else {
                break;
            };
            self.by_id.remove(&oldest);
        }
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
        while let Some(&(born, id)) = self.by_born.first() {
            if born >= forget_before {
                break;
            }
            self.by_born.pop_first();
            self.by_id.remove(&id);
        }
        let drop_payload_before = now.saturating_sub(self.retention);
        for (_, id) in self.by_born.range(..(drop_payload_before, MIN_ID)) {
            if let Some(stored) = self.by_id.get_mut(id) {
                stored.payload = None;
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
    /// still kept, at most `limit` of them.
    pub fn ids_in_buckets(
        &self,
        start: Time,
        end: Time,
        buckets: &[bool; DIGEST_BUCKETS],
        limit: usize,
    ) -> Vec<MessageId> {
        self.born_between(start, end)
            .filter(|id| buckets[bucket_of(id)])
            .filter(|id| self.by_id.get(id).is_some_and(|s| s.payload.is_some()))
            .take(limit)
            .copied()
            .collect()
    }

    fn born_between(&self, start: Time, end: Time) -> impl Iterator<Item = &MessageId> + '_ {
        let range = if start <= end {
            Some(self.by_born.range((start, MIN_ID)..=(end, MAX_ID)))
        } else {
            None
        };
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
        let mut store = MessageStore::new(Duration::from_secs(60), 2);
        store.insert(&gossip(1, 30));
        store.insert(&gossip(2, 10));
        store.insert(&gossip(3, 20));
        assert!(!store.contains(&gossip(2, 0).id));
        assert!(store.contains(&gossip(1, 0).id) && store.contains(&gossip(3, 0).id));
    }

    #[test]
    fn digests_differ_exactly_in_the_buckets_of_missing_ids() {
        let mut full = MessageStore::new(Duration::from_secs(60), 100);
        let mut partial = MessageStore::new(Duration::from_secs(60), 100);
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
        let listed = full.ids_in_buckets(start, end, &flags, 10);
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
