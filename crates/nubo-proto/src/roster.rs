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
            RosterNews::Alive(announce) => {
                announce.attributes.len() <= ATTRIBUTES_MAX
                    && announce.attributes.iter().all(|(name, value)| {
                        name.len() <= ATTRIBUTE_BYTES_MAX && value.len() <= ATTRIBUTE_BYTES_MAX
                    })
                    && announce.instances.len() <= INSTANCE_FACTS_MAX
                    && announce
                        .instances
                        .iter()
                        .all(InstanceFact::is_within_bounds)
            }
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
    /// Members marked gone on liveness news.
    pub reported_gone: u64,
    /// Members declared gone after a silence.
    pub silent_gone: u64,
}

/// One node's roster.
///
/// Contract: feed it every roster broadcast delivered ([`Roster::handle_news`]) and every
/// departure and return liveness decides ([`Roster::member_gone`], [`Roster::member_back`]);
/// call [`Roster::handle_timeout`] when
/// [`Roster::poll_timeout`] comes; broadcast whatever [`Roster::drain_news`] yields. It holds
/// at most `members_max` members and never lists itself as anything but alive.
#[derive(Debug)]
pub struct Roster {
    config: RosterConfig,
    me: Announce,
    members: BTreeMap<NodeId, Member>,
    news: Vec<RosterNews>,
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

    /// This node got a neighbour: announce at once if it never did, so a newcomer shows up
    /// without waiting a whole interval.
    pub fn neighbor_up(&mut self, now: Time) {
        if self.config.enabled && self.counters.announced == 0 {
            self.announce_now(now);
        }
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
        self.next_announce
    }

    /// Announces this node and sweeps silent and long-gone members.
    pub fn handle_timeout(&mut self, now: Time) {
        if !self.config.enabled || now < self.next_announce {
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
        r.handle_timeout(Time::from_secs(100));
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
        r.handle_timeout(Time::from_secs(300));
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
        r.handle_timeout(Time::from_secs(1_900));
        assert_eq!(state(&r, 2), Some(MemberState::Alive));
        r.handle_timeout(Time::from_secs(2_500));
        assert_eq!(state(&r, 2), Some(MemberState::Gone));
        assert_eq!(r.counters().silent_gone, 1);
        r.handle_news(Time::from_secs(2_502), alive(2, 1, 2));
        assert_eq!(state(&r, 2), Some(MemberState::Alive));
        r.member_gone(Time::from_secs(2_503), NodeId(2), false);
        r.handle_timeout(Time::from_secs(3_100));
        assert_eq!(state(&r, 2), Some(MemberState::Gone));
        r.handle_timeout(Time::from_secs(3_700));
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
}
