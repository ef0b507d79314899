//! Follows key-value operations: which are in flight, how each ended, and the newest version
//! of each key that some write had acknowledged.

use std::collections::BTreeMap;

use bytes::Bytes;
use nubo_proto::kv::{KvError, KvValue, Version};
use nubo_proto::{Event, Time};

use crate::engine::{NodeIndex, Observer};

/// An operation started and not yet ended.
#[derive(Clone, Debug)]
pub struct PendingOp {
    /// The key.
    pub key: Bytes,
    /// When it started.
    pub started: Time,
    /// The newest version acknowledged for the key when it started.
    pub floor: Option<Version>,
}

/// An operation that ended.
#[derive(Clone, Debug)]
pub struct FinishedOp {
    /// The node it ran on.
    pub node: NodeIndex,
    /// The key.
    pub key: Bytes,
    /// When it started.
    pub started: Time,
    /// When it ended.
    pub ended: Time,
    /// The newest version acknowledged for the key when it started.
    pub floor: Option<Version>,
    /// How it ended.
    pub result: Result<KvValue, KvError>,
    /// Ring hops of its lookup.
    pub hops: u8,
}

impl FinishedOp {
    /// For a successful read: whether it saw the floor (or something newer).
    pub fn read_is_fresh(&self) -> bool {
        match (&self.result, self.floor) {
            (Ok(KvValue::Read(_)), None) => true,
            (Ok(KvValue::Read(Some(record))), Some(floor)) => record.version >= floor,
            _ => false,
        }
    }
}

/// Key-value operations of a run.
#[derive(Debug, Default)]
pub struct KvTracker {
    next_tag: u64,
    /// Operations in flight, by tag.
    pub pending: BTreeMap<u64, PendingOp>,
    /// Newest acknowledged version of each key.
    pub acked: BTreeMap<Bytes, Version>,
    /// Operations that ended, in order.
    pub finished: Vec<FinishedOp>,
}

impl KvTracker {
    /// Registers an operation on `key` starting at `now`; returns its tag.
    pub fn begin(&mut self, now: Time, key: &Bytes) -> u64 {
        self.next_tag += 1;
        self.pending.insert(
            self.next_tag,
            PendingOp {
                key: key.clone(),
                started: now,
                floor: self.acked.get(key).copied(),
            },
        );
        self.next_tag
    }

    /// Forgets an operation that did not start.
    pub fn abandon(&mut self, tag: u64) {
        self.pending.remove(&tag);
    }

    /// Forgets operations of nodes that stopped (their outcomes never come).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
    }
}

impl Observer for KvTracker {
    fn on_event(&mut self, now: Time, node: NodeIndex, event: &Event) {
        let Event::Kv(outcome) = event else {
            return;
        };
        let Some(op) = self.pending.remove(&outcome.tag) else {
            return;
        };
        if let Ok(KvValue::Written(version)) = &outcome.result {
            let newest = self.acked.entry(op.key.clone()).or_insert(*version);
            *newest = (*newest).max(*version);
        }
        self.finished.push(FinishedOp {
            node,
            key: op.key,
            started: op.started,
            ended: now,
            floor: op.floor,
            result: outcome.result.clone(),
            hops: outcome.hops,
        });
    }
}
