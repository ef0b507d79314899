//! The roster: a node's list of the cloud's members, what they say about themselves and
//! whether they are alive, for operators and for the agent's view of the cloud.
//!
//! Every node broadcasts an [`Announce`] of itself when what it says changes (its address,
//! attributes or instances, and at once when it first gets a neighbour), numbered by its
//! *incarnation* (its start time) and a sequence number that grows with every announcement,
//! so that of two pieces of news about a member the newer is always known. Nothing is
//! announced while nothing changes, but for a refresh every `refresh_interval` that brings
//! members who missed the news (they joined after, or sat in a partition longer than the
//! broadcast layer remembers) up to date.
//!
//! Whether a member is alive comes from [`crate::liveness`]: its departures (confirmed by
//! probes, told once) mark the member gone or left ([`Roster::member_gone`]), a refutation
//! brings it back ([`Roster::member_back`]), and so does any announcement newer than the one
//! it was marked gone at (a member back from a partition, or restarted). A member silent for
//! `silence_max` (several refreshes) is marked gone as a last resort. Gone members are
//! forgotten after `forget_after`.
//!
//! Cost: one broadcast per change of a member and one per member per `refresh_interval`; the
//! roster holds every member, so its memory grows with the cloud (placement does not need it:
//! see [`crate::coordination`]).

use core::time::Duration;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::id::{NodeId, Peer};
use crate::instance::{INSTANCE_FACTS_MAX, InstanceFact};
use crate::time::Time;

/// Most attributes one member may announce.
pub const ATTRIBUTES_MAX: usize = 32;
/// Longest attribute name or value, in bytes.
pub const ATTRIBUTE_BYTES_MAX: usize = 256;

/// Tuning of the roster.
#[derive(Clone, Debug)]
pub struct RosterConfig {
    /// Whether this node announces itself and keeps a roster.
    pub enabled: bool,
    /// How often a node announces itself when nothing changed.
    pub refresh_interval: Duration,
    /// A member not heard from for this long is declared gone (liveness usually tells first).
    pub silence_max: Duration,
    /// A gone member is forgotten after this long.
    pub forget_after: Duration,
    /// Most members remembered; announcements of new members beyond it are ignored.
    pub members_max: usize,
}

impl Default for RosterConfig {
    fn default() -> Self {
        RosterConfig {
            enabled: true,
            refresh_interval: Duration::from_secs(600),
            silence_max: Duration::from_secs(1_800),
            forget_after: Duration::from_secs(600),
            members_max: 100_000,
        }
    }
}

/// What a member says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announce {
    /// The member and where it listens.
    pub peer: Peer,
    /// The member's start time in milliseconds: a restarted member's news is newer than
    /// anything said of its previous life.
    pub incarnation: u64,
    /// Counts the member's announcements within one incarnation.
    pub seq: u64,
    /// Free-form attributes (architecture, region, capacity), sorted by name.
    pub attributes: Vec<(String, String)>,
    /// The service instances it runs.
    pub instances: Vec<InstanceFact>,
    /// The member is leaving the cloud for good.
    pub leaving: bool,
}

impl Announce {
    /// How new this announcement is: later announcements compare greater.
    pub fn order(&self) -> (u64, u64) {
        (self.incarnation, self.seq)
    }

    /// Whether every field respects its bound.
    pub fn is_within_bounds(&self) -> bool {
        self.attributes.len() <= ATTRIBUTES_MAX
            && self.attributes.iter().all(|(name, value)| {
                name.len() <= ATTRIBUTE_BYTES_MAX && value.len() <= ATTRIBUTE_BYTES_MAX
            })
            && self.instances.len() <= INSTANCE_FACTS_MAX
            && self.instances.iter().all(InstanceFact::is_within_bounds)
    }
}

/// Most members in one page of a roster sync.
pub const PAGE_MEMBERS_MAX: usize = 512;
/// Bytes of announcements in one page of a roster sync, about: well under a frame.
const PAGE_BYTES: usize = 256 * 1024;
/// How long a node waits for the next page of a sync before it asks another neighbour.
const PULL_TIMEOUT: Duration = Duration::from_secs(2);
/// Most bytes of pages a node sends per second to all who pull from it (a burst of
/// newcomers, or a member pulling too often, gets no answer beyond it and asks elsewhere).
const PAGE_BYTES_PER_SECOND_MAX: usize = 2 << 20;

/// A sync of the roster between two neighbours: a node that starts with an empty roster
/// pulls its first neighbour's, page by page, instead of waiting for every member's next
/// announcement (they come only when something changes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RosterMessage {
    /// Send the members you know alive, by id, from just after `after` (from the first:
    /// `None`).
    Pull {
        /// The last id of the previous page.
        after: Option<NodeId>,
    },
    /// Members known alive (the sender among them), in order of id.
    Members {
        /// Their last announcements.
        members: Vec<Announce>,
        /// More follow: ask again after the last one.
        more: bool,
    },
}

impl RosterMessage {
    /// Whether every field respects its bound.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            RosterMessage::Pull { .. } => true,
            RosterMessage::Members { members, .. } => {
                members.len() <= PAGE_MEMBERS_MAX && members.iter().all(Announce::is_within_bounds)
            }
        }
    }
}

/// Where this node's first sync stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sync {
    /// To do, with the next neighbour.
    Wanted,
    /// Pages come from `from`; it is given up at `until`.
    Pulling { from: NodeId, until: Time },
    /// The last page came: later rosters stay current by announcements.
    Done,
}

/// Roster news, carried by broadcast.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RosterNews {
    /// A member is alive (or leaving), as it says.
    Alive(Announce),
}

impl RosterNews {
    /// Whether every field respects its bound.
    pub fn is_within_bounds(&self) -> bool {
        match self {
            RosterNews::Alive(announce) => announce.is_within_bounds(),
        }
    }
}

/// Whether a member is thought to be part of the cloud.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Announcing itself.
    Alive,
    /// Found dead, or silent for too long.
    Gone,
    /// Left the cloud on purpose.
    Left,
}

impl MemberState {
    /// The state's name, as shown to operators.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Gone => "gone",
            MemberState::Left => "left",
        }
    }
}

/// One member as this node knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Its last announcement.
    pub announce: Announce,
    /// Whether it is alive.
    pub state: MemberState,
    /// When this node last heard an announcement of it.
    pub last_heard: Time,
    /// When its state last changed here.
    pub since: Time,
}

/// Counters of the roster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RosterCounters {
    /// Announcements of ourselves sent.
    pub announced: u64,
    /// Pages of members sent to nodes that pulled them.
    pub pages_sent: u64,
    /// Pages of members received.
    pub pages_received: u64,
    /// Members marked gone on liveness news.
    pub reported_gone: u64,
    /// Members declared gone after a silence.
    pub silent_gone: u64,
}

/// One node's roster.
///
/// Contract: feed it every roster broadcast delivered ([`Roster::handle_news`]), every roster
/// message ([`Roster::handle_message`]), every new neighbour ([`Roster::neighbor_up`]) and
/// every departure and return liveness decides ([`Roster::member_gone`],
/// [`Roster::member_back`]); call [`Roster::handle_timeout`] when [`Roster::poll_timeout`]
/// comes; broadcast whatever [`Roster::drain_news`] yields and send its transmits. It holds
/// at most `members_max` members and never lists itself as anything but alive; it sends at
/// most `PAGE_BYTES_PER_SECOND_MAX` bytes of pages a second, whoever asks.
#[derive(Debug)]
pub struct Roster {
    config: RosterConfig,
    me: Announce,
    members: BTreeMap<NodeId, Member>,
    news: Vec<RosterNews>,
    transmits: Vec<(Peer, RosterMessage)>,
    /// This node announced itself since it first had a neighbour.
    introduced: bool,
    sync: Sync,
    /// Bytes of pages sent in the current second, and when it started.
    pages_window: (Time, usize),
    next_announce: Time,
    counters: RosterCounters,
    /// Grows with every change of what the roster holds.
    changes: u64,
}

impl Roster {
    /// A roster of `me`, whose first incarnation is `now` in milliseconds: a restarted member
    /// thus overrides whatever the cloud said about its previous life.
    pub fn new(me: Peer, config: RosterConfig, now: Time) -> Roster {
        Roster {
            me: Announce {
                peer: me,
                incarnation: now.as_micros() / 1_000,
                seq: 0,
                attributes: Vec::new(),
                instances: Vec::new(),
                leaving: false,
            },
            next_announce: if config.enabled { now } else { Time::MAX },
            config,
            members: BTreeMap::new(),
            news: Vec::new(),
            transmits: Vec::new(),
            introduced: false,
            sync: Sync::Wanted,
            pages_window: (now, 0),
            counters: RosterCounters::default(),
            changes: 0,
        }
    }

    /// Members other than this node, by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> + '_ {
        self.members.values()
    }

    /// What this node announces of itself.
    pub fn me(&self) -> &Announce {
        &self.me
    }

    /// Members thought alive, this node included.
    pub fn alive(&self) -> usize {
        1 + self
            .members
            .values()
            .filter(|m| m.state == MemberState::Alive)
            .count()
    }

    /// A number that grows whenever what the roster holds changes (a member, its state, what
    /// it says, or what this node says).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Counters since start.
    pub fn counters(&self) -> RosterCounters {
        self.counters
    }

    /// Sets the attributes this node announces (bounded: extra ones and long ones are cut),
    /// announcing them at once.
    pub fn set_attributes(&mut self, now: Time, mut attributes: Vec<(String, String)>) {
        attributes.retain(|(name, value)| {
            name.len() <= ATTRIBUTE_BYTES_MAX && value.len() <= ATTRIBUTE_BYTES_MAX
        });
        attributes.sort();
        attributes.dedup_by(|a, b| a.0 == b.0);
        attributes.truncate(ATTRIBUTES_MAX);
        self.me.attributes = attributes;
        self.announce_now(now);
    }

    /// Sets the instances this node reports (bounded: extra ones are cut), announcing them at
    /// once if they changed.
    pub fn set_instances(&mut self, now: Time, mut instances: Vec<InstanceFact>) {
        instances.retain(InstanceFact::is_within_bounds);
        instances.sort();
        instances.truncate(INSTANCE_FACTS_MAX);
        if instances != self.me.instances {
            self.me.instances = instances;
            self.announce_now(now);
        }
    }

    /// This node got `neighbor`: announce at once if it never did, so a newcomer shows up
    /// without waiting a whole interval, and pull its roster if this node never did.
    pub fn neighbor_up(&mut self, now: Time, neighbor: Peer) {
        if !self.config.enabled {
            return;
        }
        // Announcements made before (of its attributes, at start) reached no one.
        if !self.introduced {
            self.introduced = true;
            self.announce_now(now);
        }
        let idle = match self.sync {
            Sync::Wanted => true,
            Sync::Pulling { until, .. } => until <= now,
            Sync::Done => false,
        };
        if idle {
            self.pull(now, neighbor, None);
        }
    }

    /// Whether this node has pulled a neighbour's roster since it started.
    pub fn is_synced(&self) -> bool {
        self.sync == Sync::Done
    }

    fn pull(&mut self, now: Time, from: Peer, after: Option<NodeId>) {
        self.sync = Sync::Pulling {
            from: from.id,
            until: now + PULL_TIMEOUT,
        };
        self.transmits.push((from, RosterMessage::Pull { after }));
    }

    /// Handles a message of a roster sync from `from`.
    pub fn handle_message(&mut self, now: Time, from: Peer, message: RosterMessage) {
        if !self.config.enabled || !message.is_within_bounds() {
            return;
        }
        match message {
            RosterMessage::Pull { after } => self.answer_pull(now, from, after),
            RosterMessage::Members { members, more } => {
                // Only pages this node asked for count.
                if !matches!(self.sync, Sync::Pulling { from: f, .. } if f == from.id) {
                    return;
                }
                self.counters.pages_received += 1;
                let last = members.last().map(|a| a.peer.id);
                for announce in members {
                    self.on_alive(now, announce);
                }
                match last {
                    Some(last) if more => self.pull(now, from, Some(last)),
                    _ => self.sync = Sync::Done,
                }
            }
        }
    }

    fn answer_pull(&mut self, now: Time, to: Peer, after: Option<NodeId>) {
        if now >= self.pages_window.0 + Duration::from_secs(1) {
            self.pages_window = (now, 0);
        }
        if self.pages_window.1 >= PAGE_BYTES_PER_SECOND_MAX {
            return;
        }
        let start = after.map_or(core::ops::Bound::Unbounded, core::ops::Bound::Excluded);
        let alive = self
            .members
            .range((start, core::ops::Bound::Unbounded))
            .filter(|(_, m)| m.state == MemberState::Alive)
            .map(|(_, m)| &m.announce);
        // This node goes in its place in the order of ids.
        let me = Some(&self.me).filter(|me| after.is_none_or(|a| me.peer.id > a));
        let mut page: Vec<Announce> = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        let mut me = me.into_iter().peekable();
        let mut alive = alive.peekable();
        loop {
            let next = match (me.peek(), alive.peek()) {
                (Some(m), Some(a)) if m.peer.id < a.peer.id => me.next(),
                (Some(_), None) => me.next(),
                (_, Some(_)) => alive.next(),
                (None, None) => break,
            };
            let Some(announce) = next else { break };
            let size = postcard::to_allocvec(announce).map_or(PAGE_BYTES, |b| b.len());
            if page.len() >= PAGE_MEMBERS_MAX || (!page.is_empty() && bytes + size > PAGE_BYTES) {
                more = true;
                break;
            }
            bytes += size;
            page.push(announce.clone());
        }
        self.pages_window.1 = self.pages_window.1.saturating_add(bytes);
        self.counters.pages_sent += 1;
        self.transmits.push((
            to,
            RosterMessage::Members {
                members: page,
                more,
            },
        ));
    }

    /// Liveness found `peer` gone (or it left).
    pub fn member_gone(&mut self, now: Time, peer: NodeId, left: bool) {
        let Some(member) = self.members.get_mut(&peer) else {
            return;
        };
        if member.state != MemberState::Alive {
            return;
        }
        member.state = if left {
            MemberState::Left
        } else {
            MemberState::Gone
        };
        member.since = now;
        self.counters.reported_gone += 1;
        self.changes += 1;
    }

    /// Liveness found `peer`, thought gone, alive: it may have missed nothing, so it is alive
    /// again as its last announcement says.
    pub fn member_back(&mut self, now: Time, peer: NodeId) -> Option<Peer> {
        let member = self.members.get_mut(&peer)?;
        if member.state == MemberState::Alive || member.announce.leaving {
            return None;
        }
        member.state = MemberState::Alive;
        member.since = now;
        member.last_heard = now;
        self.changes += 1;
        Some(member.announce.peer)
    }

    /// This node leaves: its last announcement says so.
    pub fn leave(&mut self) {
        if self.config.enabled {
            self.me.leaving = true;
            self.me.seq += 1;
            self.news.push(RosterNews::Alive(self.me.clone()));
        }
    }

    /// News delivered by broadcast. Returns the member it names when that member just
    /// became alive here (first heard of, back after being gone, or restarted, perhaps at
    /// another address), so that other layers can learn of it too.
    pub fn handle_news(&mut self, now: Time, news: RosterNews) -> Option<Peer> {
        if !self.config.enabled || !news.is_within_bounds() {
            return None;
        }
        match news {
            RosterNews::Alive(announce) => self.on_alive(now, announce),
        }
    }

    fn on_alive(&mut self, now: Time, announce: Announce) -> Option<Peer> {
        let id = announce.peer.id;
        if id == self.me.peer.id {
            return None;
        }
        let peer = announce.peer;
        let state = if announce.leaving {
            MemberState::Left
        } else {
            MemberState::Alive
        };
        match self.members.get_mut(&id) {
            Some(member) => {
                // Only newer news counts: a delayed announcement never revives a member found
                // dead after it.
                if announce.order() <= member.announce.order() {
                    return None;
                }
                let restarted = announce.incarnation != member.announce.incarnation;
                let arrived = state == MemberState::Alive
                    && (member.state != MemberState::Alive || restarted);
                if member.state != state {
                    member.since = now;
                }
                member.state = state;
                member.announce = announce;
                self.changes += 1;
                member.last_heard = now;
                arrived.then_some(peer)
            }
            None => {
                if self.members.len() >= self.config.members_max {
                    return None;
                }
                self.changes += 1;
                self.members.insert(
                    id,
                    Member {
                        announce,
                        state,
                        last_heard: now,
                        since: now,
                    },
                );
                (state == MemberState::Alive).then_some(peer)
            }
        }
    }

    fn announce_now(&mut self, now: Time) {
        if !self.config.enabled {
            return;
        }
        self.me.seq += 1;
        self.news.push(RosterNews::Alive(self.me.clone()));
        self.counters.announced += 1;
        self.changes += 1;
        self.next_announce = now + self.config.refresh_interval;
    }

    /// When [`Roster::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Time {
        match self.sync {
            Sync::Pulling { until, .. } => self.next_announce.min(until),
            _ => self.next_announce,
        }
    }

    /// Announces this node and sweeps silent and long-gone members; a sync whose next page
    /// did not come goes on with `neighbor`.
    pub fn handle_timeout(&mut self, now: Time, neighbor: Option<Peer>) {
        if !self.config.enabled {
            return;
        }
        if let Sync::Pulling { until, .. } = self.sync
            && until <= now
        {
            match neighbor {
                Some(n) => self.pull(now, n, None),
                None => self.sync = Sync::Wanted,
            }
        }
        if now < self.next_announce {
            return;
        }
        if !self.me.leaving {
            self.announce_now(now);
        } else {
            self.next_announce = now + self.config.refresh_interval;
        }
        let silent_since = now.saturating_sub(self.config.silence_max);
        let forget_since = now.saturating_sub(self.config.forget_after);
        for member in self.members.values_mut() {
            if member.state == MemberState::Alive && member.last_heard < silent_since {
                member.state = MemberState::Gone;
                member.since = now;
                self.counters.silent_gone += 1;
                self.changes += 1;
            }
        }
        let before = self.members.len();
        self.members
            .retain(|_, m| m.state == MemberState::Alive || m.since >= forget_since);
        if self.members.len() != before {
            self.changes += 1;
        }
    }

    /// News to broadcast.
    pub fn drain_news(&mut self) -> std::vec::Drain<'_, RosterNews> {
        self.news.drain(..)
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, RosterMessage)> {
        self.transmits.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(id: u128) -> Roster {
        Roster::new(
            Peer::new(NodeId(id)),
            RosterConfig::default(),
            Time::from_secs(100),
        )
    }

    fn alive(id: u128, incarnation: u64, seq: u64) -> RosterNews {
        RosterNews::Alive(Announce {
            peer: Peer::new(NodeId(id)),
            incarnation,
            seq,
            attributes: vec![("arch".into(), "x86_64".into())],
            instances: vec![],
            leaving: false,
        })
    }

    fn state(r: &Roster, id: u128) -> Option<MemberState> {
        r.members()
            .find(|m| m.announce.peer.id == NodeId(id))
            .map(|m| m.state)
    }

    #[test]
    fn a_node_announces_at_start_on_change_and_then_only_once_a_refresh() {
        let mut r = roster(1);
        assert_eq!(r.poll_timeout(), Time::from_secs(100));
        r.handle_timeout(Time::from_secs(100), None);
        let news: Vec<_> = r.drain_news().collect();
        assert_eq!(
            news,
            vec![RosterNews::Alive(Announce {
                peer: Peer::new(NodeId(1)),
                incarnation: 100_000,
                seq: 1,
                attributes: vec![],
                instances: vec![],
                leaving: false,
            })]
        );
        assert_eq!(r.poll_timeout(), Time::from_secs(700));
        // Nothing changed: nothing said. A change is said at once.
        r.handle_timeout(Time::from_secs(300), None);
        assert_eq!(r.drain_news().count(), 0);
        r.set_attributes(Time::from_secs(301), vec![("region".into(), "eu".into())]);
        assert_eq!(r.drain_news().count(), 1);
        r.set_attributes(Time::from_secs(302), vec![("region".into(), "eu".into())]);
        assert_eq!(
            r.drain_news().count(),
            1,
            "attributes set again are said again"
        );
        r.set_instances(Time::from_secs(303), vec![]);
        assert_eq!(r.drain_news().count(), 0, "the same instances are not news");
    }

    #[test]
    fn liveness_marks_members_gone_and_back_and_only_newer_news_revives_them() {
        let mut r = roster(1);
        let now = Time::from_secs(101);
        let two = Some(Peer::new(NodeId(2)));
        assert_eq!(r.handle_news(now, alive(2, 7, 3)), two);
        assert_eq!(r.alive(), 2);
        r.member_gone(now, NodeId(2), false);
        assert_eq!(state(&r, 2), Some(MemberState::Gone));
        assert_eq!(r.counters().reported_gone, 1);
        // The same announcement, arriving late, does not revive it; a later one does.
        assert_eq!(r.handle_news(now, alive(2, 7, 3)), None);
        assert_eq!(state(&r, 2), Some(MemberState::Gone));
        assert_eq!(r.handle_news(now, alive(2, 7, 4)), two);
        assert_eq!(state(&r, 2), Some(MemberState::Alive));
        // A refutation liveness heard brings it back as it last said.
        r.member_gone(now, NodeId(2), false);
        assert_eq!(r.member_back(now, NodeId(2)), two);
        assert_eq!(state(&r, 2), Some(MemberState::Alive));
        // One that left is marked so.
        r.member_gone(now, NodeId(2), true);
        assert_eq!(state(&r, 2), Some(MemberState::Left));
    }

    #[test]
    fn silent_members_are_declared_gone_at_last_then_forgotten() {
        let mut r = roster(1);
        r.handle_news(Time::from_secs(100), alive(2, 1, 1));
        // Refreshes (and the sweep) come at 100, 700, 1300, 1900, 2500...
        r.handle_timeout(Time::from_secs(1_900), None);
        assert_eq!(state(&r, 2), Some(MemberState::Alive));
        r.handle_timeout(Time::from_secs(2_500), None);
        assert_eq!(state(&r, 2), Some(MemberState::Gone));
        assert_eq!(r.counters().silent_gone, 1);
        r.handle_news(Time::from_secs(2_502), alive(2, 1, 2));
        assert_eq!(state(&r, 2), Some(MemberState::Alive));
        r.member_gone(Time::from_secs(2_503), NodeId(2), false);
        r.handle_timeout(Time::from_secs(3_100), None);
        assert_eq!(state(&r, 2), Some(MemberState::Gone));
        r.handle_timeout(Time::from_secs(3_700), None);
        assert_eq!(state(&r, 2), None, "forgotten after forget_after");
    }

    #[test]
    fn a_restarted_member_is_newer_than_its_previous_life() {
        let mut r = roster(1);
        let now = Time::from_secs(101);
        r.handle_news(now, alive(2, 7, 900));
        r.member_gone(now, NodeId(2), false);
        let two = Some(Peer::new(NodeId(2)));
        assert_eq!(r.handle_news(now, alive(2, 8, 1)), two);
        assert_eq!(state(&r, 2), Some(MemberState::Alive));
        // Restarted before anyone noticed: still news for the other layers (a new address).
        assert_eq!(r.handle_news(now, alive(2, 9, 1)), two);
        assert_eq!(r.handle_news(now, alive(2, 9, 2)), None);
    }

    #[test]
    fn leaving_members_are_marked_left_and_oversized_news_is_ignored() {
        let mut r = roster(1);
        let now = Time::from_secs(101);
        let RosterNews::Alive(mut a) = alive(2, 3, 1);
        a.leaving = true;
        assert_eq!(r.handle_news(now, RosterNews::Alive(a.clone())), None);
        assert_eq!(state(&r, 2), Some(MemberState::Left));
        a.peer = Peer::new(NodeId(3));
        a.attributes = vec![("k".into(), "v".repeat(ATTRIBUTE_BYTES_MAX + 1))];
        r.handle_news(now, RosterNews::Alive(a));
        assert_eq!(state(&r, 3), None);
    }

    /// Delivers `from`'s transmits to `to`, returning how many there were.
    fn deliver(now: Time, from: &mut Roster, to: &mut Roster) -> usize {
        let sender = from.me().peer;
        let sent: Vec<_> = from.drain_transmits().collect();
        for (peer, message) in &sent {
            assert_eq!(peer.id, to.me().peer.id);
            to.handle_message(now, sender, message.clone());
        }
        sent.len()
    }

    #[test]
    fn a_newcomer_pulls_the_whole_roster_page_by_page_from_its_first_neighbour() {
        let now = Time::from_secs(200);
        let mut old = roster(1);
        let members = PAGE_MEMBERS_MAX as u128 + 10;
        for id in 2..2 + members {
            old.handle_news(now, alive(id, 5, 1));
        }
        // One member is gone: it is not passed on.
        old.member_gone(now, NodeId(2), false);
        let mut newcomer = roster(10_000);
        newcomer.neighbor_up(now, old.me().peer);
        assert!(!newcomer.is_synced());
        // Its own announcement is broadcast; the pull goes to the neighbour.
        assert_eq!(newcomer.drain_news().count(), 1);
        let mut rounds = 0;
        while deliver(now, &mut newcomer, &mut old) > 0 {
            deliver(now, &mut old, &mut newcomer);
            rounds += 1;
        }
        assert_eq!(rounds, 2, "two pages");
        assert!(newcomer.is_synced());
        // Every member alive there, and the neighbour itself.
        assert_eq!(newcomer.alive(), 1 + members as usize);
        assert_eq!(state(&newcomer, 2), None);
        assert_eq!(state(&newcomer, 1), Some(MemberState::Alive));
        // Later neighbours are not asked again.
        newcomer.neighbor_up(now, Peer::new(NodeId(3)));
        assert_eq!(newcomer.drain_transmits().count(), 0);
    }

    #[test]
    fn pages_nobody_asked_for_are_ignored_and_pulls_are_answered_within_a_byte_budget() {
        let now = Time::from_secs(200);
        let mut r = roster(1);
        let forged = RosterMessage::Members {
            members: vec![Announce {
                peer: Peer::new(NodeId(66)),
                incarnation: 1,
                seq: 1,
                attributes: vec![],
                instances: vec![],
                leaving: false,
            }],
            more: false,
        };
        r.handle_message(now, Peer::new(NodeId(66)), forged);
        assert_eq!(state(&r, 66), None);

        // Members with the largest attributes allowed: a page holds about PAGE_BYTES of them.
        let big: Vec<(String, String)> = (0..ATTRIBUTES_MAX)
            .map(|i| (format!("{i:0>255}"), "v".repeat(ATTRIBUTE_BYTES_MAX)))
            .collect();
        for id in 2..200 {
            r.handle_news(
                now,
                RosterNews::Alive(Announce {
                    peer: Peer::new(NodeId(id)),
                    incarnation: 5,
                    seq: 1,
                    attributes: big.clone(),
                    instances: vec![],
                    leaving: false,
                }),
            );
        }
        let asker = Peer::new(NodeId(7_000));
        let mut answered = 0;
        for _ in 0..100 {
            r.handle_message(now, asker, RosterMessage::Pull { after: None });
            for (_, message) in r.drain_transmits() {
                let bytes = postcard::to_allocvec(&message).unwrap().len();
                assert!(bytes < crate::wire::MESSAGE_BYTES_MAX, "{bytes}");
                answered += 1;
            }
        }
        let budget = PAGE_BYTES_PER_SECOND_MAX.div_ceil(PAGE_BYTES);
        assert!(answered >= 1 && answered <= budget + 1, "{answered} pages");
        // The next second has a new budget.
        r.handle_message(
            now + Duration::from_secs(1),
            asker,
            RosterMessage::Pull { after: None },
        );
        assert_eq!(r.drain_transmits().count(), 1);
    }
}
