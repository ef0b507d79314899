//! The replicated key-value store: every key lives on the `replicas` nodes that follow its
//! position on the ring (Dynamo and Cassandra's placement, on our ring).
//!
//! **Operations** may start on any node, which acts as their coordinator: it looks the key up
//! through the ring, sends the write (or read) to every replica, and answers once `write_quorum`
//! replicas stored it (or `read_quorum` answered; the newest version wins). With
//! `write_quorum + read_quorum > replicas` a read sees every write acknowledged before it began,
//! as long as the replica set did not change in between. An attempt that gets no quorum in
//! `op_timeout` is retried from a fresh lookup. A read repairs the replicas that answered with
//! an older version, and a replica that answers with a corrupted content-addressed value counts
//! as no answer (and is repaired).
//!
//! **Versions** are hybrid logical clock readings plus the writer's id ([`Version`]); the newest
//! wins everywhere (last writer wins). A delete writes a tombstone, collected `tombstone_ttl`
//! after it was stored (long enough for anti-entropy to have spread it).
//!
//! **Anti-entropy**: every `sync_interval` a node compares the key range it shares with one of
//! its neighbours on the ring (round robin over the `replicas - 1` nodes on each side): it sends
//! per-slice digests (count and fingerprint sum), the neighbour answers with the keys and
//! versions of the slices that differ, and the two exchange what each lacks. **Hand-off**: a
//! node that holds keys it is no longer a replica of (a newcomer took its place) sends them to
//! their replicas and drops its copy once every one of them confirmed it.
//!
//! **Budgets**: keys, values and the node's whole store are bounded; a write that would exceed
//! a replica's budget is refused by that replica, and nothing stored is ever evicted.
//!
//! **Durability**: on a node whose driver keeps records on disk ([`Kv::track_changes`]), no
//! acknowledgement of a stored record (a `PutAck`, a hand-off's `Stored`, this node's own
//! vote as a replica of a write it coordinates) leaves before the driver has saved the
//! changes and said so with [`Kv::saved`]. A failed save turns them into refusals, so a write
//! is never acknowledged by a replica that would lose it on a crash.

pub mod store;
pub mod version;

use core::time::Duration;
use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::ring::{Position, Ring, in_interval};
use crate::time::Time;

pub use store::{Applied, Bucket, Record, Store, StoreError, key_position};
pub use version::{Clock, Version};

/// Most entries of any list in a KV message.
pub const LIST_MAX: usize = 4096;
/// Most digest slices.
pub const BUCKETS_MAX: usize = 256;
/// Bytes of records or keys packed into one message (well under the frame limit).
pub const PACK_BYTES: usize = 640 * 1024;

/// Messages of the key-value store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum KvMessage {
    /// Store this record; answer with `PutAck` unless `op` is 0 (a repair).
    Put {
        /// The coordinator's operation.
        op: u64,
        /// What to store.
        record: Record,
    },
    /// Whether a `Put` was stored (or a newer version was already there).
    PutAck {
        /// The operation.
        op: u64,
        /// Stored, or why not.
        result: Result<(), StoreError>,
    },
    /// Send the record of `key`.
    Get {
        /// The coordinator's operation.
        op: u64,
        /// The key.
        key: Bytes,
    },
    /// The record asked for, if this replica has one.
    GetReply {
        /// The operation.
        op: u64,
        /// The record, tombstone included.
        record: Option<Record>,
    },
    /// Slice summaries of the sender's keys in `(lo, hi]`.
    Digest {
        /// Range start (exclusive).
        lo: Position,
        /// Range end (inclusive).
        hi: Position,
        /// Equal slices of the range, in order.
        buckets: Vec<Bucket>,
    },
    /// Keys and versions of the slices that differ.
    Keys {
        /// Range start (exclusive), as in the digest.
        lo: Position,
        /// Range end (inclusive).
        hi: Position,
        /// Slices in the digest.
        count: u16,
        /// Slices whose keys are all listed.
        covered: Vec<u16>,
        /// The sender's keys in those slices.
        entries: Vec<(Bytes, Version)>,
    },
    /// Send these records.
    Want(Vec<Bytes>),
    /// Records to store; `handoff` asks for a `Stored` confirmation.
    Records {
        /// The records.
        records: Vec<Record>,
        /// Whether the sender will drop its copies once confirmed.
        handoff: bool,
    },
    /// These versions (or newer) are stored here.
    Stored(Vec<(Bytes, Version)>),
}

impl KvMessage {
    /// Whether every list respects its bound.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            KvMessage::Digest { buckets, .. } => {
                !buckets.is_empty() && buckets.len() <= BUCKETS_MAX
            }
            KvMessage::Keys {
                count,
                covered,
                entries,
                ..
            } => {
                *count > 0
                    && usize::from(*count) <= BUCKETS_MAX
                    && covered.len() <= BUCKETS_MAX
                    && covered.iter().all(|c| c < count)
                    && entries.len() <= LIST_MAX
            }
            KvMessage::Want(keys) => keys.len() <= LIST_MAX,
            KvMessage::Records { records, .. } => records.len() <= LIST_MAX,
            KvMessage::Stored(keys) => keys.len() <= LIST_MAX,
            KvMessage::Put { .. }
            | KvMessage::PutAck { .. }
            | KvMessage::Get { .. }
            | KvMessage::GetReply { .. } => true,
        }
    }
}

/// Tuning of the key-value store.
#[derive(Clone, Debug)]
pub struct KvConfig {
    /// Whether this node takes part (it needs the ring).
    pub enabled: bool,
    /// Copies of each key (at most the ring's successor list length plus one).
    pub replicas: usize,
    /// Replicas that must store a write before it is acknowledged.
    pub write_quorum: usize,
    /// Replicas that must answer a read.
    pub read_quorum: usize,
    /// Time an attempt waits for its quorum.
    pub op_timeout: Duration,
    /// Attempts of an operation before it fails.
    pub op_attempts: u8,
    /// Operations in progress at once.
    pub ops_max: usize,
    /// Period of anti-entropy and hand-off.
    pub sync_interval: Duration,
    /// Slices compared per anti-entropy exchange.
    pub sync_buckets: usize,
    /// Keys considered for hand-off per period.
    pub handoff_scan: usize,
    /// Tombstones are dropped this long after they were stored.
    pub tombstone_ttl: Duration,
    /// Bytes this node stores at most (the node owner's budget).
    pub budget_bytes: usize,
    /// Longest key.
    pub key_max: usize,
    /// Largest value.
    pub value_max: usize,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            enabled: true,
            replicas: 3,
            write_quorum: 2,
            read_quorum: 2,
            op_timeout: Duration::from_secs(3),
            op_attempts: 3,
            ops_max: 4096,
            sync_interval: Duration::from_secs(5),
            sync_buckets: 64,
            handoff_scan: 512,
            tombstone_ttl: Duration::from_secs(24 * 3600),
            budget_bytes: 1 << 30,
            key_max: 1024,
            value_max: 512 * 1024,
        }
    }
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The key or value is larger than allowed.
    #[error("the {what} has {size} bytes; the limit is {max}")]
    TooLarge {
        /// "key" or "value".
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Too many operations in progress on this node.
    #[error("too many operations in progress; retry shortly")]
    Busy,
    /// Not enough replicas answered in time.
    #[error(
        "only {answered} of the {needed} replicas needed answered; the cloud may be partitioned or settling, retry shortly"
    )]
    Unavailable {
        /// Replicas that answered.
        answered: usize,
        /// Replicas needed.
        needed: usize,
    },
    /// Replicas refused the write.
    #[error("replicas refused the write: {0}")]
    Refused(StoreError),
    /// The key-value store is disabled on this node.
    #[error("the key-value store is disabled on this node")]
    Disabled,
}

/// What a successful operation produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvValue {
    /// A write (or delete) was stored by a quorum at this version.
    Written(Version),
    /// A read's newest record: `None` if the key was never written (or its tombstone was
    /// collected), a record without value if it was deleted.
    Read(Option<Record>),
}

/// The end of an operation started here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvOutcome {
    /// The caller's tag.
    pub tag: u64,
    /// The key.
    pub key: Bytes,
    /// The result.
    pub result: Result<KvValue, KvError>,
    /// Ring hops of the lookup that found the replicas.
    pub hops: u8,
}

/// Counters of the key-value store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvCounters {
    /// Records stored from puts, repairs, anti-entropy and hand-off.
    pub stored: u64,
    /// Records refused (budget, corruption).
    pub refused: u64,
    /// Read repairs sent.
    pub repairs: u64,
    /// Records sent by anti-entropy.
    pub synced: u64,
    /// Records handed off and dropped here.
    pub handed_off: u64,
    /// Tombstones collected.
    pub collected: u64,
    /// Operation attempts that timed out.
    pub timeouts: u64,
}

#[derive(Clone, Debug)]
enum Request {
    Put(Record),
    Get(Bytes),
}

impl Request {
    fn key(&self) -> &Bytes {
        match self {
            Request::Put(record) => &record.key,
            Request::Get(key) => key,
        }
    }
}

#[derive(Clone, Debug)]
enum Reply {
    Stored,
    Refused(StoreError),
    Found(Option<Record>),
    Failed,
}

#[derive(Clone, Debug)]
struct Op {
    tag: u64,
    request: Request,
    attempt: u8,
    deadline: Time,
    /// Replicas of the current attempt, once the lookup answered.
    replicas: Vec<Peer>,
    replies: BTreeMap<NodeId, Reply>,
    hops: u8,
}

/// Acknowledgements of stored records that wait until the driver says the records are on
/// disk ([`Kv::saved`]).
#[derive(Debug, Default)]
struct Unsaved {
    /// Answers to other nodes: `PutAck`s and hand-off confirmations.
    replies: Vec<(Peer, KvMessage)>,
    /// Operations coordinated here whose local replica stored the record.
    local: Vec<u64>,
}

impl Unsaved {
    fn is_empty(&self) -> bool {
        self.replies.is_empty() && self.local.is_empty()
    }
}

/// A record handed to its replicas, waiting for each to confirm.
#[derive(Clone, Debug)]
struct Handoff {
    version: Version,
    waiting: BTreeSet<NodeId>,
    until: Time,
}

/// One node's part of the replicated store.
///
/// Contract: the owner passes KV messages to [`Kv::handle_message`], unreachable peers to
/// [`Kv::peer_down`], calls [`Kv::handle_timeout`] by [`Kv::poll_timeout`], hands every
/// lookup in [`Kv::drain_lookups`] to the ring and its result to [`Kv::on_lookup`], and drains
/// transmits and outcomes. Every method that needs the ring takes it as an argument.
pub struct Kv {
    me: Peer,
    config: KvConfig,
    store: Store,
    clock: Clock,
    ops: BTreeMap<u64, Op>,
    next_op: u64,
    lookups: Vec<(u64, Position)>,
    handoffs: BTreeMap<Bytes, Handoff>,
    handoff_cursor: Position,
    next_sync: Time,
    next_partner: usize,
    counters: KvCounters,
    transmits: Vec<(Peer, KvMessage)>,
    outcomes: Vec<KvOutcome>,
    /// Whether a driver saves the records (acknowledgements then wait for [`Kv::saved`]).
    durable: bool,
    /// Acknowledgements of changes not yet handed to the driver.
    unsaved: Unsaved,
    /// Acknowledgements of the changes handed out by the last [`Kv::drain_changes`].
    saving: Unsaved,
}

impl Kv {
    /// The store of node `me`, empty. Replica and quorum counts below one count as one.
    pub fn new(me: Peer, mut config: KvConfig, now: Time) -> Kv {
        config.replicas = config.replicas.max(1);
        config.write_quorum = config.write_quorum.max(1);
        config.read_quorum = config.read_quorum.max(1);
        // Spread sync rounds: nodes start at different points of the period.
        let period = u64::try_from(config.sync_interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let offset = (me.id.0 as u64) % period;
        Kv {
            me,
            store: Store::new(config.budget_bytes),
            clock: Clock::new(me.id),
            ops: BTreeMap::new(),
            next_op: 0,
            lookups: Vec::new(),
            handoffs: BTreeMap::new(),
            handoff_cursor: me.id.0,
            next_sync: now + Duration::from_micros(offset),
            next_partner: 0,
            counters: KvCounters::default(),
            transmits: Vec::new(),
            outcomes: Vec::new(),
            durable: false,
            unsaved: Unsaved::default(),
            saving: Unsaved::default(),
            config,
        }
    }

    /// Starts tracking which records change, for a driver that keeps them on disk. From now
    /// on, acknowledgements of stored records wait for [`Kv::saved`].
    pub fn track_changes(&mut self) {
        self.store.track_changes();
        self.durable = true;
    }

    /// Records changed since the last call, each with what is stored now (`None`: removed).
    /// The driver saves them, then calls [`Kv::saved`] with the result.
    pub fn drain_changes(&mut self) -> Vec<(Bytes, Option<Record>)> {
        let unsaved = core::mem::take(&mut self.unsaved);
        self.saving.replies.extend(unsaved.replies);
        self.saving.local.extend(unsaved.local);
        let keys = self.store.drain_changed();
        keys.into_iter()
            .map(|key| {
                let record = self.store.get(&key);
                (key, record)
            })
            .collect()
    }

    /// The changes of the last [`Kv::drain_changes`] are on disk (`ok`), or could not be
    /// saved: the acknowledgements waiting on them leave now, or become refusals.
    pub fn saved(&mut self, now: Time, ok: bool) {
        if self.saving.is_empty() {
            return;
        }
        let saving = core::mem::take(&mut self.saving);
        for (peer, reply) in saving.replies {
            match reply {
                KvMessage::PutAck { op, result } => {
                    let result = if ok {
                        result
                    } else {
                        Err(StoreError::NotSaved)
                    };
                    self.transmits
                        .push((peer, KvMessage::PutAck { op, result }));
                }
                // An unconfirmed hand-off is sent again later.
                stored @ KvMessage::Stored(_) if ok => self.transmits.push((peer, stored)),
                _ => {}
            }
        }
        for op in saving.local {
            let reply = if ok {
                Reply::Stored
            } else {
                self.counters.refused += 1;
                Reply::Refused(StoreError::NotSaved)
            };
            self.on_reply(now, op, self.me.id, reply);
        }
    }

    /// Sends an acknowledgement of stored records now, or once they are saved.
    fn acknowledge(&mut self, to: Peer, message: KvMessage) {
        if self.durable {
            self.unsaved.replies.push((to, message));
        } else {
            self.transmits.push((to, message));
        }
    }

    /// Puts back a record this node held before a restart. Call it before
    /// [`Kv::track_changes`], so that restored records are not reported as changes.
    pub fn restore(&mut self, now: Time, record: &Record) -> Result<Applied, StoreError> {
        self.store.apply(now, record)
    }

    /// The records held here.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &KvConfig {
        &self.config
    }

    /// What the store did so far.
    pub fn counters(&self) -> KvCounters {
        self.counters
    }

    /// Operations in progress.
    pub fn ops_in_progress(&self) -> usize {
        self.ops.len()
    }

    /// Starts writing `value` under `key` (`None` deletes it). The outcome carries `tag`.
    pub fn put(
        &mut self,
        now: Time,
        key: Bytes,
        value: Option<Bytes>,
        tag: u64,
    ) -> Result<(), KvError> {
        self.check_sizes(&key, value.as_ref())?;
        let version = self.clock.tick(now);
        let record = Record {
            key,
            version,
            value,
        };
        self.start(now, Request::Put(record), tag)
    }

    /// Starts reading `key`. The outcome carries `tag`.
    pub fn get(&mut self, now: Time, key: Bytes, tag: u64) -> Result<(), KvError> {
        self.check_sizes(&key, None)?;
        self.start(now, Request::Get(key), tag)
    }

    fn check_sizes(&self, key: &Bytes, value: Option<&Bytes>) -> Result<(), KvError> {
        if !self.config.enabled {
            return Err(KvError::Disabled);
        }
        if key.is_empty() || key.len() > self.config.key_max {
            return Err(KvError::TooLarge {
                what: "key",
                size: key.len(),
                max: self.config.key_max,
            });
        }
        if let Some(value) = value
            && value.len() > self.config.value_max
        {
            return Err(KvError::TooLarge {
                what: "value",
                size: value.len(),
                max: self.config.value_max,
            });
        }
        Ok(())
    }

    fn start(&mut self, now: Time, request: Request, tag: u64) -> Result<(), KvError> {
        if self.ops.len() >= self.config.ops_max {
            return Err(KvError::Busy);
        }
        self.next_op += 1;
        let op = self.next_op;
        self.lookups.push((op, key_position(request.key())));
        self.ops.insert(
            op,
            Op {
                tag,
                request,
                attempt: 1,
                deadline: now + self.config.op_timeout,
                replicas: Vec::new(),
                replies: BTreeMap::new(),
                hops: 0,
            },
        );
        Ok(())
    }

    /// Lookups to start on the ring: `(operation, key position)`.
    pub fn drain_lookups(&mut self) -> std::vec::Drain<'_, (u64, Position)> {
        self.lookups.drain(..)
    }

    /// The ring found `replicas` (owner first; empty if the lookup failed) for operation `op`.
    pub fn on_lookup(&mut self, now: Time, op: u64, replicas: &[Peer], hops: u8) {
        let count = self.config.replicas;
        let Some(entry) = self.ops.get_mut(&op) else {
            return;
        };
        if replicas.is_empty() {
            // The attempt failed; the deadline retries it.
            return;
        }
        entry.replicas = replicas.iter().take(count).copied().collect();
        entry.replies.clear();
        entry.hops = hops;
        let targets = entry.replicas.clone();
        let request = entry.request.clone();
        for peer in targets {
            let message = match &request {
                Request::Put(record) => KvMessage::Put {
                    op,
                    record: record.clone(),
                },
                Request::Get(key) => KvMessage::Get {
                    op,
                    key: key.clone(),
                },
            };
            if peer.id == self.me.id {
                let reply = self.answer_locally(now, message);
                if self.durable && matches!(reply, Reply::Stored) {
                    // This node's vote counts once the record is on its disk.
                    self.unsaved.local.push(op);
                } else {
                    self.on_reply(now, op, self.me.id, reply);
                }
            } else {
                self.transmits.push((peer, message));
            }
        }
    }

    fn answer_locally(&mut self, now: Time, message: KvMessage) -> Reply {
        match message {
            KvMessage::Put { record, .. } => match self.apply(now, &record) {
                Ok(()) => Reply::Stored,
                Err(e) => Reply::Refused(e),
            },
            KvMessage::Get { key, .. } => Reply::Found(self.store.get(&key)),
            _ => Reply::Failed,
        }
    }

    /// Stores a record from anywhere, keeping the clock ahead of it.
    fn apply(&mut self, now: Time, record: &Record) -> Result<(), StoreError> {
        self.clock.observe(record.version);
        match self.store.apply(now, record) {
            Ok(Applied::Stale) => Ok(()),
            Ok(_) => {
                self.counters.stored += 1;
                Ok(())
            }
            Err(e) => {
                self.counters.refused += 1;
                Err(e)
            }
        }
    }

    fn on_reply(&mut self, now: Time, op: u64, from: NodeId, reply: Reply) {
        let Some(entry) = self.ops.get_mut(&op) else {
            return;
        };
        if !entry.replicas.iter().any(|p| p.id == from) {
            return;
        }
        entry.replies.insert(from, reply);
        self.try_finish(now, op);
    }

    fn try_finish(&mut self, now: Time, op: u64) {
        let Some(entry) = self.ops.get(&op) else {
            return;
        };
        let total = entry.replicas.len();
        let (quorum, good) = match entry.request {
            Request::Put(_) => (
                self.config.write_quorum.min(total),
                entry
                    .replies
                    .values()
                    .filter(|r| matches!(r, Reply::Stored))
                    .count(),
            ),
            Request::Get(_) => (
                self.config.read_quorum.min(total),
                entry
                    .replies
                    .values()
                    .filter(|r| matches!(r, Reply::Found(_)))
                    .count(),
            ),
        };
        let bad = entry.replies.len() - good;
        if good >= quorum {
            let entry = self.ops.remove(&op).unwrap_or_else(|| unreachable!());
            let result = match &entry.request {
                Request::Put(record) => Ok(KvValue::Written(record.version)),
                Request::Get(_) => Ok(KvValue::Read(self.read_repair(now, &entry))),
            };
            self.finish(entry, result);
        } else if bad > total - quorum {
            // A quorum can no longer answer this attempt.
            let refusal = entry.replies.values().find_map(|r| match r {
                Reply::Refused(e) => Some(*e),
                _ => None,
            });
            if let Some(error) = refusal {
                let entry = self.ops.remove(&op).unwrap_or_else(|| unreachable!());
                self.finish(entry, Err(KvError::Refused(error)));
            } else {
                self.retry_or_fail(now, op);
            }
        }
    }

    /// The newest record among the answers; replicas that answered older are sent it.
    fn read_repair(&mut self, _now: Time, entry: &Op) -> Option<Record> {
        let newest = entry
            .replies
            .values()
            .filter_map(|r| match r {
                Reply::Found(Some(record)) => Some(record),
                _ => None,
            })
            .max_by_key(|r| r.version)
            .cloned();
        if let Some(newest) = &newest {
            for (id, reply) in &entry.replies {
                let stale = match reply {
                    Reply::Found(Some(r)) => r.version < newest.version,
                    Reply::Found(None) | Reply::Failed => true,
                    _ => false,
                };
                if stale
                    && *id != self.me.id
                    && let Some(peer) = entry.replicas.iter().find(|p| p.id == *id)
                {
                    self.counters.repairs += 1;
                    self.transmits.push((
                        *peer,
                        KvMessage::Put {
                            op: 0,
                            record: newest.clone(),
                        },
                    ));
                }
            }
        }
        newest
    }

    fn finish(&mut self, entry: Op, result: Result<KvValue, KvError>) {
        self.outcomes.push(KvOutcome {
            tag: entry.tag,
            key: entry.request.key().clone(),
            result,
            hops: entry.hops,
        });
    }

    fn retry_or_fail(&mut self, now: Time, op: u64) {
        let Some(entry) = self.ops.get_mut(&op) else {
            return;
        };
        if entry.attempt >= self.config.op_attempts {
            let answered = entry
                .replies
                .values()
                .filter(|r| !matches!(r, Reply::Failed))
                .count();
            let needed = match entry.request {
                Request::Put(_) => self.config.write_quorum,
                Request::Get(_) => self.config.read_quorum,
            };
            let entry = self.ops.remove(&op).unwrap_or_else(|| unreachable!());
            self.finish(entry, Err(KvError::Unavailable { answered, needed }));
            return;
        }
        entry.attempt += 1;
        entry.deadline = now + self.config.op_timeout;
        entry.replicas.clear();
        entry.replies.clear();
        let position = key_position(entry.request.key());
        // The first lookup may still be waiting for the ring to settle.
        if !self.lookups.iter().any(|(waiting, _)| *waiting == op) {
            self.lookups.push((op, position));
        }
    }

    /// `peer` is unreachable: it answers nothing in operations waiting on it.
    pub fn peer_down(&mut self, now: Time, peer: NodeId) {
        let waiting: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| {
                o.replicas.iter().any(|p| p.id == peer) && !o.replies.contains_key(&peer)
            })
            .map(|(op, _)| *op)
            .collect();
        for op in waiting {
            self.on_reply(now, op, peer, Reply::Failed);
        }
    }

    /// When [`Kv::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Time {
        if !self.config.enabled {
            return Time::MAX;
        }
        let deadline = self.ops.values().map(|o| o.deadline).min();
        deadline.map_or(self.next_sync, |d| d.min(self.next_sync))
    }

    /// Retries overdue operations; every `sync_interval`, runs anti-entropy with one ring
    /// neighbour, hands off keys this node no longer replicates and collects old tombstones.
    pub fn handle_timeout(&mut self, now: Time, ring: &Ring) {
        if !self.config.enabled {
            return;
        }
        let overdue: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(op, _)| *op)
            .collect();
        for op in overdue {
            self.counters.timeouts += 1;
            self.retry_or_fail(now, op);
        }
        if now < self.next_sync {
            return;
        }
        self.next_sync = now + self.config.sync_interval;
        self.counters.collected +=
            self.store
                .collect_tombstones(now, self.config.tombstone_ttl) as u64;
        self.handoffs.retain(|_, h| h.until > now);
        self.sync_with_a_neighbour(ring);
        self.hand_off(now, ring);
    }

    /// Sends the digest of the range shared with the next neighbour in turn.
    fn sync_with_a_neighbour(&mut self, ring: &Ring) {
        let r = self.config.replicas;
        let successors: Vec<Peer> = ring.successors().take(r - 1).collect();
        let predecessors: Vec<Peer> = ring.predecessors().collect();
        let candidates = successors.len() + predecessors.len().min(r - 1);
        if candidates == 0 || self.store.is_empty() {
            return;
        }
        let pick = self.next_partner % candidates;
        self.next_partner = self.next_partner.wrapping_add(1);
        let me = self.me.id.0;
        // The keys this node holds lie in (pred_r, me]; a successor j places shares
        // (pred_(r-j), me] with it, a predecessor j places shares (pred_r, pred_j]. An
        // unknown bound means the whole ring (a small cloud, or one still forming).
        let pred = |i: usize| -> Position {
            if i == 0 {
                me
            } else {
                predecessors.get(i - 1).map_or(me, |p| p.id.0)
            }
        };
        let (partner, lo, hi) = if pick < successors.len() {
            let j = pick + 1;
            (successors[pick], pred(r - j), me)
        } else {
            let j = pick - successors.len() + 1;
            let partner = predecessors[j - 1];
            (partner, pred(r), partner.id.0)
        };
        let lo = if predecessors.len() < r { hi } else { lo };
        let buckets = self
            .store
            .buckets(lo, hi, self.config.sync_buckets.clamp(1, BUCKETS_MAX));
        self.transmits
            .push((partner, KvMessage::Digest { lo, hi, buckets }));
    }

    /// Sends keys this node holds but no longer replicates to their replicas.
    fn hand_off(&mut self, now: Time, ring: &Ring) {
        let r = self.config.replicas;
        if ring.predecessors().count() < r || self.store.is_empty() {
            // Without r predecessors known, this node cannot tell what it does not own.
            return;
        }
        let scanned = self
            .store
            .scan_from(self.handoff_cursor, self.config.handoff_scan);
        if let Some((last, _, _)) = scanned.last() {
            self.handoff_cursor = last.wrapping_add(1);
        }
        let mut batches: BTreeMap<NodeId, (Peer, Vec<Record>)> = BTreeMap::new();
        for (position, key, version) in scanned {
            if ring.is_replica(position, r) || self.handoffs.contains_key(&key) {
                continue;
            }
            let Some(record) = self.store.get(&key) else {
                continue;
            };
            let targets = ring.replicas_of(position, r);
            let mut waiting = BTreeSet::new();
            for peer in targets.iter().filter(|p| p.id != self.me.id) {
                waiting.insert(peer.id);
                batches
                    .entry(peer.id)
                    .or_insert_with(|| (*peer, Vec::new()))
                    .1
                    .push(record.clone());
            }
            if !waiting.is_empty() {
                self.handoffs.insert(
                    key,
                    Handoff {
                        version,
                        waiting,
                        until: now + self.config.sync_interval * 4,
                    },
                );
            }
        }
        for (_, (peer, records)) in batches {
            self.send_records(peer, records, true);
        }
    }

    /// Sends `records` to `peer` in messages of bounded size.
    fn send_records(&mut self, peer: Peer, records: Vec<Record>, handoff: bool) {
        for batch in pack(records, Record::size) {
            self.counters.synced += batch.len() as u64;
            self.transmits.push((
                peer,
                KvMessage::Records {
                    records: batch,
                    handoff,
                },
            ));
        }
    }

    /// Handles a KV message from `from`.
    pub fn handle_message(&mut self, now: Time, from: Peer, message: KvMessage) {
        if !self.config.enabled || !message.is_within_bounds() {
            return;
        }
        match message {
            KvMessage::Put { op, record } => {
                let result = self.apply(now, &record);
                if op != 0 {
                    let ack = KvMessage::PutAck { op, result };
                    if result.is_ok() {
                        self.acknowledge(from, ack);
                    } else {
                        self.transmits.push((from, ack));
                    }
                }
            }
            KvMessage::PutAck { op, result } => {
                let reply = match result {
                    Ok(()) => Reply::Stored,
                    Err(e) => Reply::Refused(e),
                };
                self.on_reply(now, op, from.id, reply);
            }
            KvMessage::Get { op, key } => {
                let record = self.store.get(&key);
                self.transmits
                    .push((from, KvMessage::GetReply { op, record }));
            }
            KvMessage::GetReply { op, record } => {
                let reply = match record {
                    // A corrupted copy is no answer; the read waits for another replica.
                    Some(record) if !record.is_intact() => Reply::Failed,
                    record => Reply::Found(record),
                };
                self.on_reply(now, op, from.id, reply);
            }
            KvMessage::Digest { lo, hi, buckets } => self.on_digest(from, lo, hi, &buckets),
            KvMessage::Keys {
                lo,
                hi,
                count,
                covered,
                entries,
            } => self.on_keys(from, lo, hi, count, &covered, entries),
            KvMessage::Want(keys) => {
                let records: Vec<Record> = keys.iter().filter_map(|k| self.store.get(k)).collect();
                self.send_records(from, records, false);
            }
            KvMessage::Records { records, handoff } => {
                let mut stored = Vec::new();
                for record in records {
                    if self.apply(now, &record).is_ok() {
                        stored.push((record.key, record.version));
                    }
                }
                if handoff && !stored.is_empty() {
                    for batch in pack(stored, |(k, _)| k.len() + 32) {
                        self.acknowledge(from, KvMessage::Stored(batch));
                    }
                }
            }
            KvMessage::Stored(keys) => self.on_stored(from.id, keys),
        }
    }

    /// Answers a digest with our keys in the slices that differ.
    fn on_digest(&mut self, from: Peer, lo: Position, hi: Position, theirs: &[Bucket]) {
        let count = theirs.len();
        let ours = self.store.buckets(lo, hi, count);
        let differing: BTreeSet<usize> = (0..count).filter(|&i| ours[i] != theirs[i]).collect();
        if differing.is_empty() {
            return;
        }
        let mut entries = Vec::new();
        let mut covered: BTreeSet<usize> = differing.clone();
        let mut bytes = 0;
        for (position, key, version) in self.store.range(lo, hi) {
            let bucket = store::bucket_of(lo, hi, count, position);
            if !covered.contains(&bucket) {
                continue;
            }
            if bytes + key.len() + 32 > PACK_BYTES || entries.len() >= LIST_MAX {
                // This slice and any later ones wait for the next round.
                covered.retain(|&b| b < bucket);
                entries.retain(|(k, _): &(Bytes, Version)| {
                    store::bucket_of(lo, hi, count, key_position(k)) < bucket
                });
                break;
            }
            bytes += key.len() + 32;
            entries.push((key.clone(), version));
        }
        if covered.is_empty() {
            return;
        }
        self.transmits.push((
            from,
            KvMessage::Keys {
                lo,
                hi,
                count: count as u16,
                covered: covered.into_iter().map(|b| b as u16).collect(),
                entries,
            },
        ));
    }

    /// Compares a neighbour's keys with ours in the covered slices: asks for what it has newer,
    /// sends what we have newer.
    fn on_keys(
        &mut self,
        from: Peer,
        lo: Position,
        hi: Position,
        count: u16,
        covered: &[u16],
        entries: Vec<(Bytes, Version)>,
    ) {
        let count = usize::from(count);
        let covered: BTreeSet<usize> = covered.iter().map(|&c| usize::from(c)).collect();
        let theirs: BTreeMap<Bytes, Version> = entries
            .into_iter()
            .filter(|(k, _)| {
                let p = key_position(k);
                in_interval(p, lo, hi) && covered.contains(&store::bucket_of(lo, hi, count, p))
            })
            .collect();
        let mut want = Vec::new();
        for (key, version) in &theirs {
            if self.store.version(key).is_none_or(|ours| ours < *version) {
                want.push(key.clone());
            }
        }
        let mut send = Vec::new();
        for (position, key, version) in self.store.range(lo, hi) {
            if !covered.contains(&store::bucket_of(lo, hi, count, position)) {
                continue;
            }
            if theirs.get(key).is_none_or(|v| *v < version) {
                send.push(key.clone());
            }
        }
        for batch in pack(want, |k| k.len() + 8) {
            self.transmits.push((from, KvMessage::Want(batch)));
        }
        let records: Vec<Record> = send.iter().filter_map(|k| self.store.get(k)).collect();
        self.send_records(from, records, false);
    }

    /// A replica confirmed hand-offs; copies every replica confirmed are dropped here.
    fn on_stored(&mut self, from: NodeId, keys: Vec<(Bytes, Version)>) {
        for (key, version) in keys {
            let done = match self.handoffs.get_mut(&key) {
                Some(handoff) if handoff.version <= version => {
                    handoff.waiting.remove(&from);
                    handoff.waiting.is_empty()
                }
                _ => false,
            };
            if done {
                let handoff = self.handoffs.remove(&key).unwrap_or_else(|| unreachable!());
                if self.store.remove_if_at(&key, handoff.version) {
                    self.counters.handed_off += 1;
                }
            }
        }
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, KvMessage)> {
        self.transmits.drain(..)
    }

    /// Operations that ended.
    pub fn drain_outcomes(&mut self) -> std::vec::Drain<'_, KvOutcome> {
        self.outcomes.drain(..)
    }
}

/// Splits `items` into batches of at most [`PACK_BYTES`] (by `size`) and [`LIST_MAX`] items.
fn pack<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut bytes = 0;
    for item in items {
        let s = size(&item);
        if !batch.is_empty() && (bytes + s > PACK_BYTES || batch.len() >= LIST_MAX) {
            batches.push(core::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += s;
        batch.push(item);
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob;
    use crate::ring::RingConfig;
    use crate::rng::Rng;

    fn peer(n: u128) -> Peer {
        Peer::new(NodeId(n << 120))
    }

    fn kv(n: u128) -> Kv {
        Kv::new(peer(n), KvConfig::default(), Time::ZERO)
    }

    fn bytes(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn record(key: &str, millis: u64, value: &str) -> Record {
        Record {
            key: bytes(key),
            version: Version {
                millis,
                counter: 0,
                writer: NodeId(99),
            },
            value: Some(bytes(value)),
        }
    }

    /// Delivers every message between the two stores until both are quiet.
    fn exchange(a: &mut Kv, b: &mut Kv, now: Time) {
        for _ in 0..20 {
            let to_b: Vec<_> = a.drain_transmits().collect();
            let to_a: Vec<_> = b.drain_transmits().collect();
            if to_a.is_empty() && to_b.is_empty() {
                return;
            }
            let (pa, pb) = (a.me, b.me);
            for (_, m) in to_b {
                b.handle_message(now, pa, m);
            }
            for (_, m) in to_a {
                a.handle_message(now, pb, m);
            }
        }
        panic!("the stores never went quiet");
    }

    #[test]
    fn a_write_is_acknowledged_after_the_write_quorum() {
        let mut a = kv(1);
        a.put(Time::from_secs(5), bytes("k"), Some(bytes("v")), 42)
            .unwrap();
        let lookups: Vec<_> = a.drain_lookups().collect();
        assert_eq!(lookups, vec![(1, key_position(b"k"))]);
        a.on_lookup(Time::from_secs(5), 1, &[peer(1), peer(2), peer(3)], 4);
        let version = a.store().version(b"k").expect("stored locally");
        assert_eq!((version.millis, version.writer), (5_000, peer(1).id));
        let sent: Vec<_> = a.drain_transmits().collect();
        assert_eq!(sent.len(), 2);
        assert!(
            sent.iter()
                .all(|(_, m)| matches!(m, KvMessage::Put { op: 1, .. }))
        );
        assert_eq!(
            a.drain_outcomes().count(),
            0,
            "one of two acknowledgements so far"
        );
        a.handle_message(
            Time::from_secs(5),
            peer(3),
            KvMessage::PutAck {
                op: 1,
                result: Ok(()),
            },
        );
        let outcomes: Vec<_> = a.drain_outcomes().collect();
        assert_eq!(
            outcomes,
            vec![KvOutcome {
                tag: 42,
                key: bytes("k"),
                result: Ok(KvValue::Written(version)),
                hops: 4,
            }]
        );
        // A late acknowledgement changes nothing.
        a.handle_message(
            Time::from_secs(5),
            peer(2),
            KvMessage::PutAck {
                op: 1,
                result: Ok(()),
            },
        );
        assert_eq!(a.drain_outcomes().count(), 0);
    }

    #[test]
    fn a_replica_that_saves_to_disk_acknowledges_only_once_the_driver_saved() {
        let now = Time::from_secs(5);
        let mut replica = kv(2);
        replica.track_changes();
        let put = |op| KvMessage::Put {
            op,
            record: record("k", 1_000, "v"),
        };
        replica.handle_message(now, peer(1), put(7));
        assert_eq!(
            replica.drain_transmits().count(),
            0,
            "no acknowledgement before the record is on disk"
        );
        let changes = replica.drain_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(
            replica.drain_transmits().count(),
            0,
            "handed to the driver, not yet saved"
        );
        replica.saved(now, true);
        assert_eq!(
            replica.drain_transmits().collect::<Vec<_>>(),
            vec![(
                peer(1),
                KvMessage::PutAck {
                    op: 7,
                    result: Ok(())
                }
            )]
        );
        // A failed save turns the acknowledgement into a refusal; a hand-off goes unconfirmed.
        replica.handle_message(now, peer(1), put(8));
        replica.handle_message(
            now,
            peer(3),
            KvMessage::Records {
                records: vec![record("h", 1_000, "v")],
                handoff: true,
            },
        );
        replica.drain_changes();
        replica.saved(now, false);
        assert_eq!(
            replica.drain_transmits().collect::<Vec<_>>(),
            vec![(
                peer(1),
                KvMessage::PutAck {
                    op: 8,
                    result: Err(StoreError::NotSaved)
                }
            )]
        );
    }

    #[test]
    fn a_write_fails_when_its_replicas_cannot_save_it() {
        let now = Time::from_secs(5);
        let mut a = kv(1);
        a.track_changes();
        a.put(now, bytes("k"), Some(bytes("v")), 42).unwrap();
        a.drain_lookups().for_each(drop);
        a.on_lookup(now, 1, &[peer(1), peer(2), peer(3)], 1);
        a.drain_transmits().for_each(drop);
        // One replica stored it, one could not save it: this node's vote, which waits for
        // its own save, decides.
        for (n, result) in [(2, Err(StoreError::NotSaved)), (3, Ok(()))] {
            a.handle_message(now, peer(n), KvMessage::PutAck { op: 1, result });
        }
        assert_eq!(a.drain_outcomes().count(), 0);
        a.drain_changes();
        a.saved(now, false);
        let outcomes: Vec<_> = a.drain_outcomes().collect();
        assert_eq!(outcomes.len(), 1);
        assert_eq!(
            outcomes[0].result,
            Err(KvError::Refused(StoreError::NotSaved))
        );
    }

    #[test]
    fn a_read_returns_the_newest_answer_and_repairs_the_older() {
        let mut a = kv(1);
        a.get(Time::ZERO, bytes("k"), 7).unwrap();
        a.drain_lookups().for_each(drop);
        a.on_lookup(Time::ZERO, 1, &[peer(2), peer(3), peer(4)], 1);
        assert_eq!(a.drain_transmits().count(), 3);
        let old = record("k", 1, "old");
        let new = record("k", 2, "new");
        let reply = |r: &Record| KvMessage::GetReply {
            op: 1,
            record: Some(r.clone()),
        };
        a.handle_message(Time::ZERO, peer(3), reply(&old));
        a.handle_message(Time::ZERO, peer(2), reply(&new));
        let outcomes: Vec<_> = a.drain_outcomes().collect();
        assert_eq!(outcomes[0].result, Ok(KvValue::Read(Some(new.clone()))));
        let repairs: Vec<_> = a.drain_transmits().collect();
        assert_eq!(
            repairs,
            vec![(peer(3), KvMessage::Put { op: 0, record: new })]
        );
    }

    #[test]
    fn a_corrupted_copy_is_no_answer_and_gets_repaired() {
        let content = b"chunk bytes".to_vec();
        let key = blob::content_key(blake3::hash(&content).as_bytes());
        let good = Record {
            key: key.clone(),
            version: Version {
                millis: 1,
                counter: 0,
                writer: NodeId(5),
            },
            value: Some(Bytes::from(content)),
        };
        let mut bad = good.clone();
        bad.value = Some(bytes("chunk bytez"));
        let mut a = kv(1);
        a.get(Time::ZERO, key, 1).unwrap();
        a.drain_lookups().for_each(drop);
        a.on_lookup(Time::ZERO, 1, &[peer(2), peer(3), peer(4)], 1);
        a.drain_transmits().for_each(drop);
        let reply = |r: &Record| KvMessage::GetReply {
            op: 1,
            record: Some(r.clone()),
        };
        a.handle_message(Time::ZERO, peer(2), reply(&bad));
        a.handle_message(Time::ZERO, peer(3), reply(&good));
        assert_eq!(
            a.drain_outcomes().count(),
            0,
            "the corrupted copy does not count"
        );
        a.handle_message(Time::ZERO, peer(4), reply(&good));
        let outcomes: Vec<_> = a.drain_outcomes().collect();
        assert_eq!(outcomes[0].result, Ok(KvValue::Read(Some(good.clone()))));
        let repairs: Vec<_> = a.drain_transmits().collect();
        assert_eq!(
            repairs,
            vec![(
                peer(2),
                KvMessage::Put {
                    op: 0,
                    record: good.clone()
                }
            )]
        );
        // And a replica never stores a corrupted copy.
        let mut b = kv(2);
        b.handle_message(Time::ZERO, peer(1), KvMessage::Put { op: 3, record: bad });
        assert_eq!(
            b.drain_transmits().collect::<Vec<_>>(),
            vec![(
                peer(1),
                KvMessage::PutAck {
                    op: 3,
                    result: Err(StoreError::Corrupt)
                }
            )]
        );
    }

    #[test]
    fn unanswered_operations_are_retried_then_fail() {
        let mut a = kv(1);
        a.put(Time::ZERO, bytes("k"), Some(bytes("v")), 1).unwrap();
        a.drain_lookups().for_each(drop);
        a.on_lookup(Time::ZERO, 1, &[peer(2), peer(3), peer(4)], 1);
        a.drain_transmits().for_each(drop);
        let ring = Ring::new(
            peer(1),
            RingConfig::default(),
            Rng::from_seed(1),
            Time::ZERO,
        );
        let timeout = KvConfig::default().op_timeout;
        for attempt in 2..=3u32 {
            a.handle_timeout(Time::ZERO + timeout * (attempt - 1), &ring);
            assert_eq!(
                a.drain_lookups().count(),
                1,
                "attempt {attempt} looks the key up again"
            );
        }
        a.handle_timeout(Time::ZERO + timeout * 3, &ring);
        let outcomes: Vec<_> = a.drain_outcomes().collect();
        assert_eq!(
            outcomes[0].result,
            Err(KvError::Unavailable {
                answered: 0,
                needed: 2
            })
        );
        assert_eq!(a.ops_in_progress(), 0);
    }

    #[test]
    fn a_lookup_held_back_until_the_ring_settles_is_not_queued_twice_by_a_retry() {
        let mut a = kv(1);
        a.get(Time::ZERO, bytes("k"), 1).unwrap();
        // Nobody takes the lookup (the ring has not settled) and the attempt times out.
        let ring = Ring::new(
            peer(1),
            RingConfig::default(),
            Rng::from_seed(1),
            Time::ZERO,
        );
        a.handle_timeout(Time::ZERO + KvConfig::default().op_timeout, &ring);
        let lookups: Vec<_> = a.drain_lookups().collect();
        assert_eq!(lookups, vec![(1, key_position(b"k"))]);
        assert_eq!(a.ops_in_progress(), 1);
    }

    #[test]
    fn refusals_from_full_replicas_fail_the_write_with_the_reason() {
        let mut a = kv(1);
        a.put(Time::ZERO, bytes("k"), Some(bytes("v")), 1).unwrap();
        a.drain_lookups().for_each(drop);
        a.on_lookup(Time::ZERO, 1, &[peer(2), peer(3), peer(4)], 1);
        let full = Err(StoreError::Full { budget: 10 });
        for p in [2, 3] {
            a.handle_message(
                Time::ZERO,
                peer(p),
                KvMessage::PutAck {
                    op: 1,
                    result: full,
                },
            );
        }
        let outcomes: Vec<_> = a.drain_outcomes().collect();
        assert_eq!(
            outcomes[0].result,
            Err(KvError::Refused(StoreError::Full { budget: 10 }))
        );
    }

    #[test]
    fn oversized_keys_and_values_are_refused_up_front() {
        let mut a = kv(1);
        let big = Bytes::from(vec![0u8; 2000]);
        assert!(matches!(
            a.put(Time::ZERO, big.clone(), None, 1),
            Err(KvError::TooLarge { what: "key", .. })
        ));
        let huge = Bytes::from(vec![0u8; 600 * 1024]);
        assert!(matches!(
            a.put(Time::ZERO, bytes("k"), Some(huge), 1),
            Err(KvError::TooLarge { what: "value", .. })
        ));
        assert_eq!(a.drain_lookups().count(), 0);
    }

    #[test]
    fn anti_entropy_makes_two_replicas_equal() {
        let mut a = kv(1);
        let mut b = kv(2);
        let now = Time::ZERO;
        for r in [record("only-a", 1, "x"), record("both", 1, "old")] {
            a.store.apply(now, &r).unwrap();
        }
        for r in [record("only-b", 1, "y"), record("both", 2, "new")] {
            b.store.apply(now, &r).unwrap();
        }
        for i in 0..100 {
            a.store
                .apply(now, &record(&format!("same{i}"), 1, "z"))
                .unwrap();
            b.store
                .apply(now, &record(&format!("same{i}"), 1, "z"))
                .unwrap();
        }
        let (lo, hi) = (peer(0).id.0, peer(0).id.0);
        let buckets = a.store().buckets(lo, hi, 16);
        b.handle_message(now, peer(1), KvMessage::Digest { lo, hi, buckets });
        exchange(&mut b, &mut a, now);
        assert_eq!(a.store().buckets(lo, hi, 16), b.store().buckets(lo, hi, 16));
        assert_eq!(a.store().get(b"both"), Some(record("both", 2, "new")));
        assert_eq!(b.store().get(b"only-a"), Some(record("only-a", 1, "x")));
        assert_eq!(a.store().len(), 103);
    }

    #[test]
    fn keys_no_longer_owned_are_handed_off_then_dropped() {
        let config = KvConfig {
            replicas: 2,
            ..KvConfig::default()
        };
        let mut a = Kv::new(peer(100), config, Time::ZERO);
        let ring_config = RingConfig {
            successors: 3,
            ..RingConfig::default()
        };
        let mut ring = Ring::new(peer(100), ring_config, Rng::from_seed(1), Time::ZERO);
        for n in [60, 70, 80, 90, 110] {
            ring.hear(Time::ZERO, peer(n));
        }
        // A key whose replicas are 70 and 80: 100 holds it but should not.
        let key = (0..)
            .map(|i| format!("key{i}"))
            .find(|k| {
                let p = key_position(k.as_bytes());
                p > (65u128 << 120) && p < (70u128 << 120)
            })
            .unwrap();
        a.store.apply(Time::ZERO, &record(&key, 1, "v")).unwrap();
        let sync = a.poll_timeout();
        a.handle_timeout(sync, &ring);
        let handoffs: Vec<_> = a
            .drain_transmits()
            .filter(|(_, m)| matches!(m, KvMessage::Records { handoff: true, .. }))
            .map(|(to, _)| to)
            .collect();
        assert_eq!(handoffs, vec![peer(70), peer(80)]);
        let stored = vec![(bytes(&key), record(&key, 1, "v").version)];
        a.handle_message(sync, peer(70), KvMessage::Stored(stored.clone()));
        assert_eq!(a.store().len(), 1, "kept until every replica confirmed");
        a.handle_message(sync, peer(80), KvMessage::Stored(stored));
        assert_eq!(a.store().len(), 0);
        assert_eq!(a.counters().handed_off, 1);
    }
}
