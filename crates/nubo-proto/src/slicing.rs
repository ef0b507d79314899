//! Ordered slicing: every node learns where it stands in the cloud by some attribute (free
//! storage, bandwidth, an uptime-based reliability score), and so which of `k` slices, or
//! which top share, it belongs to, with no coordinator. This is how `share = "10%"` placements
//! are decided locally.
//!
//! The approach is Sliver's (Gramoli, Vigfusson, Birman, Kermarrec, van Renesse, 2008): each
//! node keeps the latest value it heard from every node it heard from within a sliding window,
//! and estimates its rank as the fraction of those values below its own. Values travel in
//! batches: every cycle a node sends a random peer its news (its own value when due for a
//! refresh, and the values it learnt most recently) and the peer answers with its own news, so
//! a new value spreads like a rumour, each holder passing it on `forwards` times, and a node
//! hears news every cycle however few nodes happen to pick it. Samples carry their age, not a timestamp, so no clock is
//! shared; they expire `window` after their origin emitted them, which is how nodes that left
//! or crashed drop out, and a changed value replaces the old one everywhere within a few
//! cycles. A node that knows few values (it just joined) asks a neighbour for all it knows.
//!
//! Ties are broken by node, so every node has a distinct rank.

use core::time::Duration;
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::time::Time;

/// Most samples in one message.
pub const SAMPLES_MAX: usize = 4096;

/// One node's attribute value as known somewhere.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The node, by its 64-bit key ([`node_key`]).
    pub node: u64,
    /// Its attribute value.
    pub value: f64,
    /// How long ago the node emitted it, in milliseconds.
    pub age_ms: u32,
}

/// The 64-bit key a node's samples are filed under (collisions are negligible below ~10⁸
/// nodes).
pub fn node_key(id: NodeId) -> u64 {
    (id.0 as u64) ^ ((id.0 >> 64) as u64)
}

/// Messages of slicing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SlicingMessage {
    /// The sender's news; the receiver answers with its own.
    Push(Vec<Sample>),
    /// News sent in answer to a push or a snapshot request.
    Answer(Vec<Sample>),
    /// Asks for every value the receiver knows (sent by a node that just joined).
    Snapshot,
}

impl SlicingMessage {
    /// Whether the message is well-formed: bounded, finite values.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            SlicingMessage::Push(samples) | SlicingMessage::Answer(samples) => {
                samples.len() <= SAMPLES_MAX && samples.iter().all(|s| s.value.is_finite())
            }
            SlicingMessage::Snapshot => true,
        }
    }
}

/// Tuning of slicing.
#[derive(Clone, Debug)]
pub struct SlicingConfig {
    /// Whether this node takes part (experiments that measure other layers turn it off).
    pub enabled: bool,
    /// One batch per cycle.
    pub interval: Duration,
    /// How often a node emits its own value anew.
    pub refresh: Duration,
    /// Samples expire this long after their origin emitted them (a few refreshes).
    pub window: Duration,
    /// How many times each node passes on each value it learns: with 2, an emission reaches
    /// about 85% of the nodes, and a value is missed by a node only if it misses every
    /// refresh within the window.
    pub forwards: u8,
    /// Most samples in one batch.
    pub batch_max: usize,
    /// Most samples kept (the cloud's size, or a sample of it beyond that).
    pub samples_max: usize,
    /// A node knowing fewer values than this asks a neighbour for a snapshot.
    pub snapshot_below: usize,
}

impl Default for SlicingConfig {
    fn default() -> Self {
        SlicingConfig {
            enabled: true,
            interval: Duration::from_secs(1),
            refresh: Duration::from_secs(40),
            window: Duration::from_secs(100),
            forwards: 3,
            batch_max: 2048,
            samples_max: 100_000,
            snapshot_below: 8,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Known {
    value: f64,
    born: Time,
}

/// Counters of what slicing did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlicingCounters {
    /// Samples received that told something new.
    pub learnt: u64,
    /// Samples dropped for lack of room in the forwarding queue.
    pub dropped: u64,
    /// Snapshots asked for.
    pub snapshots: u64,
}

/// The slicing state machine of one node.
///
/// Contract: the owner sets the node's attribute ([`Slicing::set_value`]), calls
/// [`Slicing::handle_timeout`] no later than [`Slicing::poll_timeout`] with a random peer,
/// reports new neighbours ([`Slicing::neighbor_up`]), passes every slicing message to
/// [`Slicing::handle_message`], and drains transmits.
pub struct Slicing {
    me: u64,
    config: SlicingConfig,
    value: f64,
    value_born: Time,
    known: BTreeMap<u64, Known>,
    /// How many known values rank below ours.
    below: usize,
    fresh: VecDeque<(u64, u8)>,
    next_cycle: Time,
    next_refresh: Time,
    /// Batches our current emission still goes out in.
    own_left: u8,
    snapshot_asked: bool,
    counters: SlicingCounters,
    transmits: Vec<(Peer, SlicingMessage)>,
}

impl Slicing {
    /// Slicing for node `me`, whose attribute is 0 until set.
    pub fn new(me: NodeId, config: SlicingConfig, now: Time) -> Slicing {
        Slicing {
            me: node_key(me),
            value: 0.0,
            value_born: now,
            known: BTreeMap::new(),
            below: 0,
            fresh: VecDeque::new(),
            next_cycle: now,
            next_refresh: now,
            own_left: 0,
            snapshot_asked: false,
            counters: SlicingCounters::default(),
            transmits: Vec::new(),
            config,
        }
    }

    /// This node's attribute value.
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Number of other nodes' values known.
    pub fn known(&self) -> usize {
        self.known.len()
    }

    /// Estimated rank in `[0, 1)`: the fraction of known values below ours (0 = lowest).
    pub fn rank(&self) -> f64 {
        self.below as f64 / (self.known.len() + 1) as f64
    }

    /// Which of `slices` equal slices, counted from the lowest values, this node is in.
    pub fn slice(&self, slices: u32) -> u32 {
        let slices = slices.max(1);
        ((self.rank() * f64::from(slices)) as u32).min(slices - 1)
    }

    /// Whether this node is among the `share` (0 to 1) of nodes with the highest values.
    pub fn in_top(&self, share: f64) -> bool {
        self.rank() >= 1.0 - share.clamp(0.0, 1.0)
    }

    /// What the layer did so far.
    pub fn counters(&self) -> SlicingCounters {
        self.counters
    }

    /// Sets this node's attribute value; the cloud learns it within a few cycles.
    pub fn set_value(&mut self, now: Time, value: f64) {
        if !value.is_finite() || value == self.value {
            return;
        }
        self.value = value;
        self.below = self
            .known
            .iter()
            .filter(|(key, k)| ranks_below(k.value, **key, value, self.me))
            .count();
        self.value_born = now;
        self.next_refresh = now;
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, SlicingMessage)> {
        self.transmits.drain(..)
    }

    /// When the next cycle starts.
    pub fn poll_timeout(&self) -> Time {
        if self.config.enabled {
            self.next_cycle
        } else {
            Time::MAX
        }
    }

    /// A new neighbour: a node that knows almost nothing asks it for a snapshot.
    pub fn neighbor_up(&mut self, peer: Peer) {
        if self.config.enabled
            && !self.snapshot_asked
            && self.known.len() < self.config.snapshot_below
        {
            self.snapshot_asked = true;
            self.counters.snapshots += 1;
            self.transmits.push((peer, SlicingMessage::Snapshot));
        }
    }

    /// Runs a cycle: expires old values and sends a batch to `peer`.
    pub fn handle_timeout(&mut self, now: Time, peer: Option<Peer>) {
        if now < self.poll_timeout() {
            return;
        }
        self.next_cycle = now + self.config.interval;
        self.expire(now);
        let Some(peer) = peer else {
            // Alone for now: keep what is due for the first peer.
            return;
        };
        let batch = self.news(now);
        self.transmits.push((peer, SlicingMessage::Push(batch)));
    }

    /// Takes the news for one batch: our own value while its emission is going out, then the
    /// values learnt most recently, each at most once per batch.
    fn news(&mut self, now: Time) -> Vec<Sample> {
        let mut batch = Vec::new();
        if now >= self.next_refresh {
            self.next_refresh = now + self.config.refresh;
            self.value_born = now;
            self.own_left = self.config.forwards.max(1);
        }
        if self.own_left > 0 {
            self.own_left -= 1;
            batch.push(Sample {
                node: self.me,
                value: self.value,
                age_ms: age_ms(now, self.value_born),
            });
        }
        // Samples with forwards left go back to the end of the queue, for a later batch (to
        // another random peer).
        let queued = self.fresh.len();
        for _ in 0..queued {
            if batch.len() >= self.config.batch_max.min(SAMPLES_MAX) {
                break;
            }
            let Some((key, left)) = self.fresh.pop_front() else {
                break;
            };
            if let Some(known) = self.known.get(&key) {
                batch.push(sample(key, known, now));
                if left > 1 {
                    self.fresh.push_back((key, left - 1));
                }
            }
        }
        batch
    }

    /// Handles a slicing message from `from`.
    pub fn handle_message(&mut self, now: Time, from: Peer, message: SlicingMessage) {
        if !self.config.enabled || !message.is_within_bounds() {
            return;
        }
        match message {
            SlicingMessage::Push(samples) => {
                for s in samples {
                    self.learn(now, s);
                }
                let answer = self.news(now);
                if !answer.is_empty() {
                    self.transmits.push((from, SlicingMessage::Answer(answer)));
                }
            }
            SlicingMessage::Answer(samples) => {
                for s in samples {
                    self.learn(now, s);
                }
            }
            SlicingMessage::Snapshot => self.send_snapshot(now, from),
        }
    }

    fn learn(&mut self, now: Time, s: Sample) {
        let age = Duration::from_millis(u64::from(s.age_ms));
        if s.node == self.me || age >= self.config.window {
            return;
        }
        let born = now.saturating_sub(age);
        let previous = self.known.get(&s.node).copied();
        if previous.is_some_and(|p| p.born >= born) {
            return;
        }
        if previous.is_none() && self.known.len() >= self.config.samples_max {
            return;
        }
        if let Some(p) = previous
            && ranks_below(p.value, s.node, self.value, self.me)
        {
            self.below -= 1;
        }
        if ranks_below(s.value, s.node, self.value, self.me) {
            self.below += 1;
        }
        self.known.insert(
            s.node,
            Known {
                value: s.value,
                born,
            },
        );
        self.counters.learnt += 1;
        // Pass on what is new: a first value, a changed one, or a new emission (a refresh). The
        // same emission arriving again by a longer path only looks a little younger (ages do
        // not count time in transit) and is not passed on again.
        let new_emission = previous.is_none_or(|p| {
            p.value != s.value || born > p.born + self.config.refresh / 2
        });
        if new_emission {
            if self.fresh.len() >= self.config.samples_max {
                self.fresh.pop_front();
                self.counters.dropped += 1;
            }
            self.fresh.push_back((s.node, self.config.forwards));
        }
    }

    fn expire(&mut self, now: Time) {
        let oldest = now.saturating_sub(self.config.window);
        let (me, value) = (self.me, self.value);
        let mut removed_below = 0;
        self.known.retain(|key, k| {
            let keep = k.born >= oldest;
            if !keep && ranks_below(k.value, *key, value, me) {
                removed_below += 1;
            }
            keep
        });
        self.below -= removed_below;
    }

    fn send_snapshot(&mut self, now: Time, to: Peer) {
        let mut batch = vec![Sample {
            node: self.me,
            value: self.value,
            age_ms: age_ms(now, self.value_born),
        }];
        for (key, known) in &self.known {
            if batch.len() == SAMPLES_MAX {
                self.transmits
                    .push((to, SlicingMessage::Answer(std::mem::take(&mut batch))));
            }
            batch.push(sample(*key, known, now));
        }
        self.transmits.push((to, SlicingMessage::Answer(batch)));
    }
}

/// Whether a node with `value` and `key` ranks below one with `mine` and `my_key`.
fn ranks_below(value: f64, key: u64, mine: f64, my_key: u64) -> bool {
    value.total_cmp(&mine).then(key.cmp(&my_key)).is_lt()
}

fn sample(key: u64, known: &Known, now: Time) -> Sample {
    Sample {
        node: key,
        value: known.value,
        age_ms: age_ms(now, known.born),
    }
}

fn age_ms(now: Time, born: Time) -> u32 {
    u32::try_from(now.saturating_since(born).as_millis()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slicing(id: u128, value: f64) -> Slicing {
        let mut s = Slicing::new(NodeId(id), SlicingConfig::default(), Time::ZERO);
        s.set_value(Time::ZERO, value);
        s
    }

    fn samples(values: &[(u64, f64)], age_ms: u32) -> SlicingMessage {
        SlicingMessage::Answer(
            values
                .iter()
                .map(|&(node, value)| Sample { node, value, age_ms })
                .collect(),
        )
    }

    #[test]
    fn rank_counts_the_values_below_and_breaks_ties_by_node() {
        let mut s = slicing(1, 5.0);
        let peer = Peer::new(NodeId(9));
        s.handle_message(Time::ZERO, peer, samples(&[(10, 1.0), (11, 9.0), (12, 5.0), (0, 5.0)], 0));
        // Below: 1.0, and 5.0 of key 0 (< our key 1); not 5.0 of key 12.
        assert_eq!(s.known(), 4);
        assert_eq!(s.rank(), 2.0 / 5.0);
        assert_eq!(s.slice(5), 2);
        assert!(!s.in_top(0.5));
        s.set_value(Time::ZERO, 100.0);
        assert_eq!(s.rank(), 4.0 / 5.0);
        assert!(s.in_top(0.2));
    }

    #[test]
    fn newer_values_replace_older_ones_and_old_ones_expire() {
        let mut s = slicing(1, 5.0);
        let peer = Peer::new(NodeId(9));
        s.handle_message(Time::ZERO, peer, samples(&[(10, 1.0)], 0));
        assert_eq!(s.rank(), 0.5);
        // An older report of node 10 changes nothing; a newer one moves it above us.
        let later = Time::from_secs(10);
        s.handle_message(later, peer, samples(&[(10, 9.0)], 20_000));
        assert_eq!(s.rank(), 0.5);
        s.handle_message(later, peer, samples(&[(10, 9.0)], 1_000));
        assert_eq!(s.rank(), 0.0);
        // Nothing more from node 10: it expires a window after it emitted.
        let expired = later + SlicingConfig::default().window;
        s.handle_timeout(expired, None);
        assert_eq!(s.known(), 0);
        assert_eq!(s.rank(), 0.0);
    }

    #[test]
    fn pushes_carry_our_value_then_what_we_learnt_and_are_answered_with_news() {
        let mut s = slicing(1, 5.0);
        let peer = Peer::new(NodeId(9));
        s.handle_message(Time::ZERO, peer, samples(&[(10, 1.0), (11, 2.0)], 0));
        s.handle_timeout(Time::from_millis(500), Some(peer));
        let sent: Vec<SlicingMessage> = s.drain_transmits().map(|(_, m)| m).collect();
        let expected = SlicingMessage::Push(vec![
            Sample { node: node_key(NodeId(1)), value: 5.0, age_ms: 0 },
            Sample { node: 10, value: 1.0, age_ms: 500 },
            Sample { node: 11, value: 2.0, age_ms: 500 },
        ]);
        assert_eq!(sent, vec![expected]);
        // Each value, ours included, goes out in two batches (forwards = 2): the second
        // time in the answer to a push from another node.
        let push = SlicingMessage::Push(vec![Sample { node: 12, value: 3.0, age_ms: 0 }]);
        s.handle_message(Time::from_millis(700), peer, push);
        let answer: Vec<SlicingMessage> = s.drain_transmits().map(|(_, m)| m).collect();
        assert!(matches!(&answer[..], [SlicingMessage::Answer(news)] if news.len() == 4));
        // Only the value learnt from that push is still news.
        s.handle_timeout(Time::from_millis(1_500), Some(peer));
        let sent: Vec<SlicingMessage> = s.drain_transmits().map(|(_, m)| m).collect();
        assert_eq!(
            sent,
            vec![SlicingMessage::Push(vec![Sample { node: 12, value: 3.0, age_ms: 800 }])]
        );
        // The same emission arriving again is not news; a refresh is.
        s.handle_timeout(Time::from_millis(2_500), Some(peer));
        s.drain_transmits().count();
        s.handle_message(Time::from_secs(3), peer, samples(&[(10, 1.0)], 2_900));
        s.handle_timeout(Time::from_secs(3), Some(peer));
        assert_eq!(s.drain_transmits().next().map(|(_, m)| m), Some(SlicingMessage::Push(vec![])));
        s.handle_message(Time::from_secs(30), peer, samples(&[(10, 1.0)], 0));
        s.handle_timeout(Time::from_secs(30), Some(peer));
        let refreshed: Vec<SlicingMessage> = s.drain_transmits().map(|(_, m)| m).collect();
        assert!(matches!(&refreshed[..], [SlicingMessage::Push(news)] if news.len() == 1));
    }

    #[test]
    fn a_newcomer_asks_for_a_snapshot_once() {
        let mut old = slicing(1, 5.0);
        let peer = Peer::new(NodeId(9));
        old.handle_message(Time::ZERO, peer, samples(&[(10, 1.0), (11, 2.0)], 0));
        let mut new = slicing(2, 1.5);
        new.neighbor_up(Peer::new(NodeId(1)));
        new.neighbor_up(Peer::new(NodeId(3)));
        let asks: Vec<_> = new.drain_transmits().collect();
        assert_eq!(asks.len(), 1);
        old.handle_message(Time::ZERO, Peer::new(NodeId(2)), SlicingMessage::Snapshot);
        for (_, answer) in old.drain_transmits().collect::<Vec<_>>() {
            new.handle_message(Time::ZERO, Peer::new(NodeId(1)), answer);
        }
        assert_eq!(new.known(), 3);
        assert_eq!(new.rank(), 1.0 / 4.0);
    }

    #[test]
    fn garbage_is_ignored() {
        let mut s = slicing(1, 5.0);
        s.handle_message(Time::ZERO, Peer::new(NodeId(9)), samples(&[(10, f64::NAN)], 0));
        assert_eq!(s.known(), 0);
        s.set_value(Time::ZERO, f64::INFINITY);
        assert_eq!(s.value(), 5.0);
    }
}
