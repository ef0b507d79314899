//! Following broadcasts through a run: who delivered what, after how many hops, at what cost.

use std::collections::{BTreeSet, HashMap};

use nubo_proto::broadcast::Gossip;
use nubo_proto::{Event, MessageId, Time};

use crate::engine::{NodeIndex, Observer};

/// What happened to one tracked broadcast.
#[derive(Clone, Debug)]
pub struct BroadcastRecord {
    /// The message.
    pub id: MessageId,
    /// When it was sent.
    pub sent_at: Time,
    /// Nodes that delivered it (the origin included).
    pub delivered: u32,
    /// Copies of its payload received by any node (eager pushes, graft answers, repairs).
    pub payloads_received: u64,
    /// Largest hop count of a delivery (the last delivery hop).
    pub hops_max: u16,
    /// Latest delivery time.
    pub last_delivery: Time,
    /// Which nodes delivered it, when the tracker keeps sets.
    pub delivered_by: BTreeSet<NodeIndex>,
}

impl BroadcastRecord {
    /// Relative message redundancy: payload copies per delivery beyond the first, 0 optimal.
    pub fn rmr(&self) -> f64 {
        if self.delivered <= 1 {
            return 0.0;
        }
        self.payloads_received as f64 / (self.delivered - 1) as f64 - 1.0
    }
}

/// An observer that follows the broadcasts it is told about.
#[derive(Default)]
pub struct BroadcastTracker {
    ids: HashMap<MessageId, usize>,
    /// One record per tracked broadcast, in the order they were sent.
    pub records: Vec<BroadcastRecord>,
    keep_sets: bool,
    /// Deliveries of a message a node had already delivered (must stay 0).
    pub duplicates: u64,
}

impl BroadcastTracker {
    /// A tracker; with `keep_sets` it remembers which node delivered which message, which
    /// costs memory but lets checks name the nodes that missed one and catch duplicates.
    pub fn new(keep_sets: bool) -> BroadcastTracker {
        BroadcastTracker {
            keep_sets,
            ..BroadcastTracker::default()
        }
    }

    /// Starts following `id`, sent at `now` by `origin` (which delivered it already).
    pub fn track(&mut self, id: MessageId, now: Time, origin: NodeIndex) {
        self.ids.insert(id, self.records.len());
        let mut delivered_by = BTreeSet::new();
        if self.keep_sets {
            delivered_by.insert(origin);
        }
        self.records.push(BroadcastRecord {
            id,
            sent_at: now,
            delivered: 1,
            payloads_received: 0,
            hops_max: 0,
            last_delivery: now,
            delivered_by,
        });
    }

    fn record_mut(&mut self, id: &MessageId) -> Option<&mut BroadcastRecord> {
        let index = *self.ids.get(id)?;
        self.records.get_mut(index)
    }

    /// Forgets every node's deliveries of `node` (it restarted with empty state).
    pub fn forget_node(&mut self, node: NodeIndex) {
        if self.keep_sets {
            for record in &mut self.records {
                if record.delivered_by.remove(&node) {
                    record.delivered -= 1;
                }
            }
        }
    }
}

impl Observer for BroadcastTracker {
    fn on_event(&mut self, now: Time, node: NodeIndex, event: &Event) {
        let Event::Delivered(delivery) = event else {
            return;
        };
        let keep_sets = self.keep_sets;
        let mut duplicate = false;
        if let Some(record) = self.record_mut(&delivery.id) {
            if keep_sets && !record.delivered_by.insert(node) {
                duplicate = true;
            } else {
                record.delivered += 1;
                record.hops_max = record.hops_max.max(delivery.hops);
                record.last_delivery = record.last_delivery.max(now);
            }
        }
        if duplicate {
            self.duplicates += 1;
        }
    }

    fn on_gossip(&mut self, _now: Time, _from: NodeIndex, _to: NodeIndex, gossip: &Gossip) {
        if let Some(record) = self.record_mut(&gossip.id) {
            record.payloads_received += 1;
        }
    }
}
