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
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::time::Time;

/// Most samples in one message.
pub const SAMPLES_MAX: usize = 4096;
/// Buckets in an anti-entropy digest.
pub const DIGEST_BUCKETS: usize = 64;

/// One node's attribute value as known somewhere.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// The node, by its 64-bit key ([`node_key`]).
    pub node: u64,
    /// Its attribute value.
    pub value: f64,
    /// Which emission of the node this is: increases with each emission (it is the emitting
    /// node's time, so it keeps increasing across restarts); only compared between samples
    /// of the same node.
    pub version: u64,
    /// A departure notice: a neighbour saw the node fail or leave. It supersedes the
    /// emission it follows (`version` is one more) and loses to any later one, so a node
    /// wrongly thought gone reappears at its next refresh.
    pub gone: bool,
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
    /// News sent in answer to a push.
    Answer(Vec<Sample>),
    /// Anti-entropy: a digest of what the sender knows, [`DIGEST_BUCKETS`] entries of
    /// (count, XOR of entry hashes), buckets by node key. The receiver answers with what it
    /// knows in the buckets that differ; an empty digest (a newcomer's) asks for everything.
    Digest(Vec<(u32, u64)>),
    /// What the sender knows in the buckets that differed: known, not news, so the receiver
    /// does not pass it on.
    Known(Vec<Sample>),
    /// The answer to a [`SlicingMessage::Digest`] that differed: the answerer's own digest,
    /// so that the first sender sends back what it knows better (anti-entropy both ways).
    /// Answered with `Known` only, never with another digest.
    DigestReply(Vec<(u32, u64)>),
}

impl SlicingMessage {
    /// Whether the message is well-formed: bounded, finite values.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            SlicingMessage::Push(samples)
            | SlicingMessage::Answer(samples)
            | SlicingMessage::Known(samples) => {
                samples.len() <= SAMPLES_MAX && samples.iter().all(|s| s.value.is_finite())
            }
            SlicingMessage::Digest(buckets) | SlicingMessage::DigestReply(buckets) => {
                buckets.len() == DIGEST_BUCKETS
            }
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
    /// Period of anti-entropy: a digest to a neighbour, which sends back what differs. This
    /// repairs what rumours missed (a rumour passed on only a few times can miss a node).
    pub digest_interval: Duration,
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
            digest_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Known {
    value: f64,
    version: u64,
    born: Time,
    gone: bool,
}

impl Known {
    /// Whether this entry counts below a node with `mine` and `my_key`.
    fn below(&self, key: u64, mine: f64, my_key: u64) -> bool {
        !self.gone && ranks_below(self.value, key, mine, my_key)
    }
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
    /// How many entries are departure notices.
    gone: usize,
    /// News to pass on: the sample as learnt (its birth, to compute its age when sent) and
    /// how many more times. A newer emission of the same node may follow it in the queue; the
    /// receivers keep the newest, so a superseded entry costs a few bytes, not a lookup.
    fresh: VecDeque<(Sample, Time, u8)>,
    next_cycle: Time,
    next_refresh: Time,
    next_expire: Time,
    next_digest: Time,
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
            gone: 0,
            fresh: VecDeque::new(),
            next_cycle: now,
            next_refresh: now,
            next_expire: now,
            next_digest: now + config.digest_interval,
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

    /// Number of other nodes' values known (departed nodes excluded).
    pub fn known(&self) -> usize {
        self.known.len() - self.gone
    }

    /// Number of departure notices held.
    pub fn departed_known(&self) -> usize {
        self.gone
    }

    /// Whether the value of the node with key `node` is known.
    pub fn knows(&self, node: u64) -> bool {
        self.known.get(&node).is_some_and(|k| !k.gone)
    }

    /// When this node last emitted its value.
    pub fn last_emission(&self) -> Time {
        self.value_born
    }

    /// Estimated rank in `[0, 1)`: the fraction of known values below ours (0 = lowest).
    pub fn rank(&self) -> f64 {
        self.below as f64 / (self.known() + 1) as f64
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
            .filter(|(key, k)| k.below(**key, value, self.me))
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
            let empty = vec![(0, 0); DIGEST_BUCKETS];
            self.transmits.push((peer, SlicingMessage::Digest(empty)));
        }
    }

    /// Runs a cycle: expires old values and sends a batch to `peer`.
    pub fn handle_timeout(&mut self, now: Time, peer: Option<Peer>) {
        if now < self.poll_timeout() {
            return;
        }
        self.next_cycle = now + self.config.interval;
        if now >= self.next_expire {
            // A tenth of the window late at most, for a tenth of the cost of every cycle.
            self.next_expire = now + self.config.window / 10;
            self.expire(now);
        }
        let Some(peer) = peer else {
            // Alone for now: keep what is due for the first peer.
            return;
        };
        let batch = self.news(now);
        self.transmits.push((peer, SlicingMessage::Push(batch)));
        if now >= self.next_digest {
            self.next_digest = now + self.config.digest_interval;
            let digest = self.digest().to_vec();
            self.transmits.push((peer, SlicingMessage::Digest(digest)));
        }
    }

    /// Count and XOR of entry hashes per bucket of node keys.
    fn digest(&self) -> [(u32, u64); DIGEST_BUCKETS] {
        let mut buckets = [(0u32, 0u64); DIGEST_BUCKETS];
        for (key, known) in &self.known {
            let bucket = &mut buckets[bucket_of(*key)];
            bucket.0 = bucket.0.wrapping_add(1);
            bucket.1 ^= entry_hash(*key, known);
        }
        buckets
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
            batch.push(self.own_sample(now));
        }
        // Samples with forwards left go back to the end of the queue, for a later batch (to
        // another random peer).
        let queued = self.fresh.len();
        let room = self.config.batch_max.min(SAMPLES_MAX);
        for _ in 0..queued {
            if batch.len() >= room {
                break;
            }
            let Some((news, born, left)) = self.fresh.pop_front() else {
                break;
            };
            batch.push(Sample {
                age_ms: age_ms(now, born),
                ..news
            });
            if left > 1 {
                self.fresh.push_back((news, born, left - 1));
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
                // Answer before learning, so that the pusher's own news is not sent back to it
                // (which would waste one of the few times each value is passed on).
                let answer = self.news(now);
                if !answer.is_empty() {
                    self.transmits.push((from, SlicingMessage::Answer(answer)));
                }
                for s in samples {
                    self.learn(now, s, true);
                }
            }
            SlicingMessage::Answer(samples) => {
                for s in samples {
                    self.learn(now, s, true);
                }
            }
            SlicingMessage::Known(samples) => {
                for s in samples {
                    self.learn(now, s, false);
                }
            }
            SlicingMessage::Digest(theirs) => {
                if self.send_differences(now, from, &theirs) {
                    let ours = self.digest().to_vec();
                    self.transmits
                        .push((from, SlicingMessage::DigestReply(ours)));
                }
            }
            SlicingMessage::DigestReply(theirs) => {
                self.send_differences(now, from, &theirs);
            }
        }
    }

    /// Files sample `s`; if it is a new emission and `news`, it will be passed on.
    fn learn(&mut self, now: Time, s: Sample, news: bool) {
        let age = Duration::from_millis(u64::from(s.age_ms));
        if s.node == self.me || age >= self.config.window {
            return;
        }
        let born = now.saturating_sub(age);
        let room = self.known.len() < self.config.samples_max;
        let fresh = Known {
            value: s.value,
            version: s.version,
            born,
            gone: s.gone,
        };
        let previous = match self.known.entry(s.node) {
            Entry::Occupied(mut entry) => {
                let known = entry.get_mut();
                if s.version < known.version {
                    return;
                }
                if s.version == known.version {
                    // The same emission by another path: its age only grew in transit, so the
                    // earliest birth is the truest.
                    known.born = known.born.min(born);
                    return;
                }
                Some(std::mem::replace(known, fresh))
            }
            Entry::Vacant(entry) => {
                if !room || s.gone {
                    // Nothing to forget.
                    return;
                }
                entry.insert(fresh);
                None
            }
        };
        self.replace_counts(s.node, previous.as_ref(), Some(&fresh));
        self.counters.learnt += 1;
        if news {
            self.queue_news(s, born);
        }
    }

    /// A neighbour failed or left: spread a departure notice for it, if we know its value.
    pub fn departed(&mut self, now: Time, node: NodeId) {
        let key = node_key(node);
        let Some(known) = self.known.get(&key).copied() else {
            return;
        };
        if known.gone {
            return;
        }
        let notice = Known {
            version: known.version + 1,
            born: now,
            gone: true,
            ..known
        };
        self.known.insert(key, notice);
        self.replace_counts(key, Some(&known), Some(&notice));
        let news = Sample {
            node: key,
            value: known.value,
            version: notice.version,
            gone: true,
            age_ms: 0,
        };
        self.queue_news(news, now);
    }

    /// Keeps `below` and `gone` right when the entry of `key` changes from `old` to `new`.
    fn replace_counts(&mut self, key: u64, old: Option<&Known>, new: Option<&Known>) {
        let (value, me) = (self.value, self.me);
        if let Some(old) = old {
            self.below -= usize::from(old.below(key, value, me));
            self.gone -= usize::from(old.gone);
        }
        if let Some(new) = new {
            self.below += usize::from(new.below(key, value, me));
            self.gone += usize::from(new.gone);
        }
    }

    fn queue_news(&mut self, news: Sample, born: Time) {
        if self.fresh.len() >= self.config.samples_max {
            self.fresh.pop_front();
            self.counters.dropped += 1;
        }
        self.fresh.push_back((news, born, self.config.forwards));
    }

    fn own_sample(&self, now: Time) -> Sample {
        Sample {
            node: self.me,
            value: self.value,
            version: self.value_born.as_micros(),
            gone: false,
            age_ms: age_ms(now, self.value_born),
        }
    }

    fn expire(&mut self, now: Time) {
        let oldest = now.saturating_sub(self.config.window);
        let (me, value) = (self.me, self.value);
        let (mut below, mut gone) = (0, 0);
        self.known.retain(|key, k| {
            let keep = k.born >= oldest;
            if !keep {
                below += usize::from(k.below(*key, value, me));
                gone += usize::from(k.gone);
            }
            keep
        });
        self.below -= below;
        self.gone -= gone;
    }

    /// Sends `to` our own sample and what we know in the buckets where its digest differs
    /// from ours; returns whether any bucket differed.
    fn send_differences(&mut self, now: Time, to: Peer, theirs: &[(u32, u64)]) -> bool {
        let ours = self.digest();
        let mut differing = [false; DIGEST_BUCKETS];
        for (flag, (a, b)) in differing.iter_mut().zip(ours.iter().zip(theirs)) {
            *flag = a != b;
        }
        let any = differing.contains(&true);
        let mut batch = vec![self.own_sample(now)];
        for (key, known) in &self.known {
            if !differing[bucket_of(*key)] {
                continue;
            }
            if batch.len() == SAMPLES_MAX {
                self.transmits
                    .push((to, SlicingMessage::Known(std::mem::take(&mut batch))));
            }
            batch.push(sample(*key, known, now));
        }
        self.transmits.push((to, SlicingMessage::Known(batch)));
        any
    }
}

fn bucket_of(key: u64) -> usize {
    (key % DIGEST_BUCKETS as u64) as usize
}

fn entry_hash(key: u64, known: &Known) -> u64 {
    let mut x = key ^ known.version.rotate_left(21) ^ u64::from(known.gone);
    crate::rng::splitmix64(&mut x)
}

/// Whether a node with `value` and `key` ranks below one with `mine` and `my_key`.
fn ranks_below(value: f64, key: u64, mine: f64, my_key: u64) -> bool {
    value.total_cmp(&mine).then(key.cmp(&my_key)).is_lt()
}

fn sample(key: u64, known: &Known, now: Time) -> Sample {
    Sample {
        node: key,
        value: known.value,
        version: known.version,
        gone: known.gone,
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
        let config = SlicingConfig {
            forwards: 2,
            ..SlicingConfig::default()
        };
        let mut s = Slicing::new(NodeId(id), config, Time::ZERO);
        s.set_value(Time::ZERO, value);
        s
    }

    fn sample(node: u64, value: f64, version: u64, age_ms: u32) -> Sample {
        Sample {
            node,
            value,
            version,
            gone: false,
            age_ms,
        }
    }

    /// An answer carrying `values`, all emitted as `version`, `age_ms` ago.
    fn samples(values: &[(u64, f64)], version: u64, age_ms: u32) -> SlicingMessage {
        SlicingMessage::Answer(
            values
                .iter()
                .map(|&(node, value)| sample(node, value, version, age_ms))
                .collect(),
        )
    }

    fn sent(s: &mut Slicing) -> Vec<SlicingMessage> {
        s.drain_transmits().map(|(_, m)| m).collect()
    }

    const PEER: Peer = Peer::new(NodeId(9));

    #[test]
    fn rank_counts_the_values_below_and_breaks_ties_by_node() {
        let mut s = slicing(1, 5.0);
        let values = [(10, 1.0), (11, 9.0), (12, 5.0), (0, 5.0)];
        s.handle_message(Time::ZERO, PEER, samples(&values, 1, 0));
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
    fn newer_emissions_replace_older_ones_and_old_ones_expire() {
        let mut s = slicing(1, 5.0);
        s.handle_message(Time::ZERO, PEER, samples(&[(10, 1.0)], 1, 0));
        assert_eq!(s.rank(), 0.5);
        // An older emission of node 10 changes nothing; a newer one moves it above us.
        let later = Time::from_secs(10);
        s.handle_message(later, PEER, samples(&[(10, 9.0)], 0, 0));
        assert_eq!(s.rank(), 0.5);
        s.handle_message(later, PEER, samples(&[(10, 9.0)], 2, 1_000));
        assert_eq!(s.rank(), 0.0);
        // Nothing more from node 10: it expires a window after it emitted.
        let expired = later + SlicingConfig::default().window;
        s.handle_timeout(expired, None);
        assert_eq!(s.known(), 0);
        assert_eq!(s.rank(), 0.0);
    }

    #[test]
    fn news_travels_in_pushes_and_answers_a_few_times_each() {
        let mut s = slicing(1, 5.0);
        s.handle_message(Time::ZERO, PEER, samples(&[(10, 1.0), (11, 2.0)], 1, 0));
        s.handle_timeout(Time::from_millis(500), Some(PEER));
        let me = node_key(NodeId(1));
        let expected = SlicingMessage::Push(vec![
            sample(me, 5.0, 500_000, 0),
            sample(10, 1.0, 1, 500),
            sample(11, 2.0, 1, 500),
        ]);
        assert_eq!(sent(&mut s), vec![expected]);
        // Each emission, ours included, goes out twice (forwards = 2): the second time in the
        // answer to a push, which does not echo the push's own news back.
        let push = SlicingMessage::Push(vec![sample(12, 3.0, 1, 0)]);
        s.handle_message(Time::from_millis(700), PEER, push);
        assert!(matches!(&sent(&mut s)[..], [SlicingMessage::Answer(news)] if news.len() == 3));
        // Only the value learnt from that push is still to be passed on, twice.
        s.handle_timeout(Time::from_millis(1_500), Some(PEER));
        let push = SlicingMessage::Push(vec![sample(12, 3.0, 1, 800)]);
        assert_eq!(sent(&mut s), vec![push.clone()]);
        s.handle_timeout(Time::from_millis(2_500), Some(PEER));
        assert_eq!(
            sent(&mut s),
            vec![SlicingMessage::Push(vec![sample(12, 3.0, 1, 1_800)])]
        );
        // The same emission arriving again is not news; a new one is.
        s.handle_message(
            Time::from_millis(2_600),
            PEER,
            samples(&[(10, 1.0)], 1, 2_500),
        );
        s.handle_timeout(Time::from_millis(3_500), Some(PEER));
        assert_eq!(sent(&mut s), vec![SlicingMessage::Push(vec![])]);
        s.handle_message(Time::from_millis(3_600), PEER, samples(&[(10, 1.0)], 2, 0));
        s.handle_timeout(Time::from_millis(4_500), Some(PEER));
        let push = SlicingMessage::Push(vec![sample(10, 1.0, 2, 900)]);
        assert_eq!(sent(&mut s), vec![push]);
    }

    #[test]
    fn a_newcomer_asks_for_a_snapshot_once() {
        let mut old = slicing(1, 5.0);
        old.handle_message(Time::ZERO, PEER, samples(&[(10, 1.0), (11, 2.0)], 1, 0));
        let mut new = slicing(2, 1.5);
        new.neighbor_up(Peer::new(NodeId(1)));
        new.neighbor_up(Peer::new(NodeId(3)));
        let ask = SlicingMessage::Digest(vec![(0, 0); DIGEST_BUCKETS]);
        assert_eq!(sent(&mut new), vec![ask.clone()]);
        old.handle_message(Time::ZERO, Peer::new(NodeId(2)), ask);
        for answer in sent(&mut old) {
            new.handle_message(Time::ZERO, Peer::new(NodeId(1)), answer);
        }
        assert_eq!(new.known(), 3);
        assert_eq!(new.rank(), 1.0 / 4.0);
    }

    #[test]
    fn a_departure_notice_removes_a_value_until_its_owner_speaks_again() {
        let mut s = slicing(1, 5.0);
        let gone_node = NodeId(77);
        let key = node_key(gone_node);
        s.handle_message(Time::ZERO, PEER, samples(&[(key, 1.0), (10, 9.0)], 3, 0));
        assert_eq!((s.known(), s.rank()), (2, 1.0 / 3.0));
        // A neighbour of ours failed: we forget it, and tell others.
        s.departed(Time::from_secs(1), gone_node);
        assert_eq!((s.known(), s.rank()), (1, 0.0));
        s.handle_timeout(Time::from_secs(1), Some(PEER));
        let notice = Sample {
            node: key,
            value: 1.0,
            version: 4,
            gone: true,
            age_ms: 0,
        };
        assert!(
            matches!(&sent(&mut s)[..], [SlicingMessage::Push(news)] if news.contains(&notice))
        );
        // Another node's notice for the same emission changes nothing; a new emission of the
        // node brings it back.
        s.handle_message(
            Time::from_secs(2),
            PEER,
            SlicingMessage::Answer(vec![notice]),
        );
        assert_eq!(s.known(), 1);
        s.handle_message(Time::from_secs(3), PEER, samples(&[(key, 1.0)], 9, 0));
        assert_eq!((s.known(), s.rank()), (2, 1.0 / 3.0));
        // A notice about a node we never knew is not kept.
        let stranger = Sample {
            node: 555,
            ..notice
        };
        s.handle_message(
            Time::from_secs(3),
            PEER,
            SlicingMessage::Answer(vec![stranger]),
        );
        assert_eq!(s.known(), 2);
    }

    #[test]
    fn anti_entropy_sends_only_what_differs() {
        let mut a = slicing(1, 5.0);
        let mut b = slicing(2, 6.0);
        let shared = [(10, 1.0), (11, 2.0), (12, 3.0)];
        a.handle_message(Time::ZERO, PEER, samples(&shared, 1, 0));
        b.handle_message(Time::ZERO, PEER, samples(&shared, 1, 0));
        b.handle_message(Time::ZERO, PEER, samples(&[(13, 4.0)], 1, 0));
        let digest = SlicingMessage::Digest(a.digest().to_vec());
        b.handle_message(Time::ZERO, Peer::new(NodeId(1)), digest);
        let answer = sent(&mut b);
        let [SlicingMessage::Known(known), SlicingMessage::DigestReply(_)] = &answer[..] else {
            panic!("{answer:?}");
        };
        // b's own value and the bucket of node 13 (which holds nothing else here).
        assert_eq!(known.len(), 2);
        assert!(known.iter().any(|s| s.node == 13));
        for message in answer {
            a.handle_message(Time::ZERO, Peer::new(NodeId(2)), message);
        }
        assert_eq!(a.known(), 5);
        // The other way: b's digest brings back what a knows that b does not (a's own value),
        // with no further digest.
        let back = sent(&mut a);
        let [SlicingMessage::Known(known)] = &back[..] else {
            panic!("{back:?}");
        };
        assert!(known.iter().any(|s| s.node == node_key(NodeId(1))));
        for message in back {
            b.handle_message(Time::ZERO, Peer::new(NodeId(1)), message);
        }
        assert!(b.knows(node_key(NodeId(1))));
        assert!(sent(&mut b).is_empty());
        // What anti-entropy brings is not news: nothing to pass on.
        a.handle_timeout(Time::from_secs(1), Some(PEER));
        let pushed = sent(&mut a);
        assert!(matches!(&pushed[..], [SlicingMessage::Push(news), ..] if news.len() == 1 + 3));
    }

    #[test]
    fn garbage_is_ignored() {
        let mut s = slicing(1, 5.0);
        s.handle_message(Time::ZERO, PEER, samples(&[(10, f64::NAN)], 1, 0));
        assert_eq!(s.known(), 0);
        s.set_value(Time::ZERO, f64::INFINITY);
        assert_eq!(s.value(), 5.0);
    }
}
