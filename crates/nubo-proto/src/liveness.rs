//! Liveness: which members are gone, decided once and told to everyone, with no cloud-wide
//! heartbeat.
//!
//! A node's overlay neighbours watch it (HyParView's keepalives and the transport). When one
//! of them loses it ([`Liveness::suspect`]), it does not declare it gone at once: it pings
//! the suspect itself and asks `helpers` other members to ping it too (SWIM's indirect
//! probe), so a link that failed on one side only, or a neighbour that was merely slow,
//! costs nothing. Only if no one reaches the suspect within `probe_timeout` does the node
//! broadcast [`LivenessNews::Gone`]. Every node that hears it marks the member *departed*
//! and tells the layers above (the ring drops it, coordinators replan its instances).
//!
//! A member that hears of its own death (it was cut off, not dead) refutes it: it raises its
//! *life* (start time in milliseconds, plus one per refutation) above the one the news named
//! and broadcasts [`LivenessNews::Alive`], which undoes the departure everywhere. A member
//! that leaves on purpose broadcasts its own `Gone` with `left` set.
//!
//! Cost: one broadcast per failure (a few, when several neighbours finish their probes at
//! once), nothing while nothing changes. Departures are remembered for `remember`, at most
//! `departed_max` of them.

use core::time::Duration;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::broadcast::MessageId;
use crate::id::{NodeId, Peer};
use crate::time::Time;

/// Most probes this node runs, and helps with, at once.
pub const PROBES_MAX: usize = 256;

/// Tuning of liveness.
#[derive(Clone, Debug)]
pub struct LivenessConfig {
    /// Whether this node takes part.
    pub enabled: bool,
    /// Members asked to reach a suspect.
    pub helpers: usize,
    /// How long a suspect has to answer, directly or through a helper.
    pub probe_timeout: Duration,
    /// How long a departure is remembered.
    pub remember: Duration,
    /// Most departures remembered (the oldest go first).
    pub departed_max: usize,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            enabled: true,
            helpers: 3,
            probe_timeout: Duration::from_millis(1_000),
            remember: Duration::from_secs(600),
            departed_max: 100_000,
        }
    }
}

/// News of a member's life, carried by broadcast.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LivenessNews {
    /// The member is gone: no one could reach it, or it left.
    Gone {
        /// The member.
        id: NodeId,
        /// Its life as the sender knew it (0: unknown).
        life: u64,
        /// It left on purpose (it said so itself).
        left: bool,
    },
    /// The member is alive, in a life newer than any news of its death.
    Alive {
        /// The member.
        id: NodeId,
        /// Its life now.
        life: u64,
    },
}

impl LivenessNews {
    /// The broadcast id of news of a death: named by its content (the member, the life, and
    /// whether it left), so that the neighbours that declare a member at the same moment
    /// spread one message. `None` for news of life, which only its member publishes.
    pub fn named_id(&self) -> Option<MessageId> {
        match *self {
            LivenessNews::Gone { id, life, left } => Some(MessageId::named(
                id,
                life.saturating_mul(2) | u64::from(left),
            )),
            LivenessNews::Alive { .. } => None,
        }
    }
}

/// Messages of the liveness probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LivenessMessage {
    /// Answer with `Pong` carrying this nonce.
    Ping {
        /// Echoed.
        nonce: u64,
    },
    /// The answer to a `Ping`.
    Pong {
        /// The ping's nonce.
        nonce: u64,
        /// The sender's life.
        life: u64,
    },
    /// Please try to reach `target`, and say if it answered.
    Check {
        /// The suspect.
        target: Peer,
        /// The asker's probe.
        nonce: u64,
    },
    /// `target` answered a helper.
    Reached {
        /// The suspect.
        target: NodeId,
        /// The asker's probe.
        nonce: u64,
    },
    /// The receiver was declared gone in this life (it was cut off and is back): it should
    /// refute.
    Declared {
        /// The life the news named.
        life: u64,
    },
}

/// What liveness tells the layers above.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessEvent {
    /// A member is gone (`left`: on purpose).
    Gone(NodeId, bool),
    /// A member thought gone is alive.
    Back(NodeId),
}

/// Counters of liveness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LivenessCounters {
    /// Probes started.
    pub probes: u64,
    /// Probes a suspect (or a helper for it) answered.
    pub refuted_by_probe: u64,
    /// Members this node declared gone.
    pub declared: u64,
    /// News of this node's own death it refuted.
    pub refuted: u64,
}

/// A probe this node runs.
#[derive(Clone, Copy, Debug)]
struct Probe {
    target: Peer,
    nonce: u64,
    deadline: Time,
}

/// A probe this node runs for another.
#[derive(Clone, Copy, Debug)]
struct Help {
    asker: Peer,
    target: NodeId,
    asker_nonce: u64,
    deadline: Time,
}

/// A member known to be gone.
#[derive(Clone, Copy, Debug)]
struct Departed {
    life: u64,
    since: Time,
    left: bool,
    /// When the member, heard from again, was last told of its departure.
    told: Option<Time>,
}

/// One node's liveness.
///
/// Contract: report every neighbour the overlay lost with [`Liveness::suspect`] (or, when it
/// left on purpose, [`Liveness::left`]); feed it its messages and every liveness broadcast
/// delivered; call [`Liveness::handle_timeout`] by [`Liveness::poll_timeout`]; send its
/// transmits and broadcast its news; pass its events to the layers above. Nothing is
/// declared gone while a probe of it could still succeed, and this node never declares
/// itself gone unless it leaves.
#[derive(Debug)]
pub struct Liveness {
    me: Peer,
    config: LivenessConfig,
    life: u64,
    leaving: bool,
    next_nonce: u64,
    probes: BTreeMap<NodeId, Probe>,
    helping: BTreeMap<u64, Help>,
    departed: BTreeMap<NodeId, Departed>,
    /// Departures added or removed so far.
    departed_changes: u64,
    /// When the oldest departure is to be forgotten.
    next_forget: Time,
    /// Lives members announced when they refuted news of their death: older news of their
    /// death is stale. Every node hears the same refutations, so all judge news alike.
    lives: BTreeMap<NodeId, u64>,
    transmits: Vec<(Peer, LivenessMessage)>,
    news: Vec<LivenessNews>,
    events: Vec<LivenessEvent>,
    counters: LivenessCounters,
}

impl Liveness {
    /// Liveness of `me`, whose first life is its start time in milliseconds.
    pub fn new(me: Peer, config: LivenessConfig, now: Time) -> Liveness {
        Liveness {
            me,
            life: (now.as_micros() / 1_000).max(1),
            leaving: false,
            next_nonce: 0,
            probes: BTreeMap::new(),
            helping: BTreeMap::new(),
            departed: BTreeMap::new(),
            departed_changes: 0,
            next_forget: Time::MAX,
            lives: BTreeMap::new(),
            transmits: Vec::new(),
            news: Vec::new(),
            events: Vec::new(),
            counters: LivenessCounters::default(),
            config,
        }
    }

    /// How many helpers a probe asks.
    pub fn helpers_wanted(&self) -> usize {
        self.config.helpers
    }

    /// This node's life.
    pub fn life(&self) -> u64 {
        self.life
    }

    /// Whether `id` is known to be gone.
    pub fn is_departed(&self, id: NodeId) -> bool {
        self.departed.contains_key(&id)
    }

    /// How many times a member was marked gone or no longer gone: equal counts mean the
    /// same departures.
    pub fn departed_changes(&self) -> u64 {
        self.departed_changes
    }

    /// Members known to be gone, with whether they left on purpose and since when.
    pub fn departed(&self) -> impl Iterator<Item = (NodeId, bool, Time)> + '_ {
        self.departed.iter().map(|(id, d)| (*id, d.left, d.since))
    }

    /// Members being probed now.
    pub fn suspects(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.probes.keys().copied()
    }

    /// Counters since start.
    pub fn counters(&self) -> LivenessCounters {
        self.counters
    }

    fn nonce(&mut self) -> u64 {
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.next_nonce
    }

    /// The overlay lost `peer` (unreachable or silent): probe it, directly and through
    /// `helpers`, before declaring it gone.
    pub fn suspect(&mut self, now: Time, peer: Peer, helpers: &[Peer]) {
        if !self.config.enabled
            || peer.id == self.me.id
            || self.departed.contains_key(&peer.id)
            || self.probes.contains_key(&peer.id)
            || self.probes.len() >= PROBES_MAX
        {
            return;
        }
        let nonce = self.nonce();
        self.counters.probes += 1;
        // The suspect's other neighbours probe it at about the same time: each waits a
        // little longer, by an amount of its own, so that the first verdict usually reaches
        // the others before they declare it too.
        let mut pair = (self.me.id.0 ^ peer.id.0.rotate_left(64)) as u64;
        let spread = u64::try_from(self.config.probe_timeout.as_micros() / 2).unwrap_or(0);
        let jitter = Duration::from_micros(crate::rng::splitmix64(&mut pair) % spread.max(1));
        self.probes.insert(
            peer.id,
            Probe {
                target: peer,
                nonce,
                deadline: now + self.config.probe_timeout + jitter,
            },
        );
        self.transmits.push((peer, LivenessMessage::Ping { nonce }));
        for helper in helpers
            .iter()
            .filter(|h| h.id != peer.id && h.id != self.me.id)
            .take(self.config.helpers)
        {
            self.transmits.push((
                *helper,
                LivenessMessage::Check {
                    target: peer,
                    nonce,
                },
            ));
        }
    }

    /// `peer` said goodbye: it is gone, no probe needed (its own news says so too).
    pub fn left(&mut self, now: Time, peer: NodeId) {
        self.probes.remove(&peer);
        let life = self.lives.get(&peer).copied().unwrap_or(0);
        self.depart(now, peer, life, true);
    }

    /// This node leaves: its last news says so.
    pub fn leave(&mut self) {
        if self.config.enabled && !self.leaving {
            self.leaving = true;
            self.news.push(LivenessNews::Gone {
                id: self.me.id,
                life: self.life,
                left: true,
            });
        }
    }

    /// Evidence that `peer` is alive: any message from it. A probe of it ends; a member
    /// declared gone is told so (at most once per `probe_timeout`), so that it refutes the
    /// news everywhere.
    pub fn heard_from(&mut self, now: Time, peer: Peer) {
        if self.probes.remove(&peer.id).is_some() {
            self.counters.refuted_by_probe += 1;
        }
        let wait = self.config.probe_timeout;
        if self.departed.get(&peer.id).is_some_and(|d| d.left) {
            // It said goodbye, and talks again: it came back (a new life).
            self.departed.remove(&peer.id);
            self.departed_changes += 1;
            self.events.push(LivenessEvent::Back(peer.id));
            return;
        }
        if let Some(departed) = self.departed.get_mut(&peer.id)
            && departed.told.is_none_or(|t| t + wait <= now)
        {
            departed.told = Some(now);
            let life = departed.life;
            self.transmits
                .push((peer, LivenessMessage::Declared { life }));
        }
    }

    /// A message of the probes.
    pub fn handle_message(&mut self, now: Time, from: Peer, message: LivenessMessage) {
        if !self.config.enabled {
            return;
        }
        match message {
            LivenessMessage::Ping { nonce } => {
                self.transmits.push((
                    from,
                    LivenessMessage::Pong {
                        nonce,
                        life: self.life,
                    },
                ));
            }
            LivenessMessage::Pong { nonce, .. } => {
                if let Some(help) = self.helping.remove(&nonce) {
                    if help.target == from.id {
                        self.transmits.push((
                            help.asker,
                            LivenessMessage::Reached {
                                target: help.target,
                                nonce: help.asker_nonce,
                            },
                        ));
                    } else {
                        self.helping.insert(nonce, help);
                    }
                }
            }
            LivenessMessage::Check { target, nonce } => {
                if target.id == self.me.id {
                    // We are the suspect: answer the asker directly.
                    self.transmits.push((
                        from,
                        LivenessMessage::Reached {
                            target: target.id,
                            nonce,
                        },
                    ));
                } else if self.helping.len() < PROBES_MAX {
                    let own = self.nonce();
                    self.helping.insert(
                        own,
                        Help {
                            asker: from,
                            target: target.id,
                            asker_nonce: nonce,
                            deadline: now + self.config.probe_timeout,
                        },
                    );
                    self.transmits
                        .push((target, LivenessMessage::Ping { nonce: own }));
                }
            }
            LivenessMessage::Declared { life } => self.handle_news(
                now,
                LivenessNews::Gone {
                    id: self.me.id,
                    life,
                    left: false,
                },
            ),
            LivenessMessage::Reached { target, nonce } => {
                if self.probes.get(&target).is_some_and(|p| p.nonce == nonce) {
                    self.probes.remove(&target);
                    self.counters.refuted_by_probe += 1;
                }
            }
        }
    }

    fn note_life(&mut self, id: NodeId, life: u64) {
        if id == self.me.id {
            return;
        }
        let known = self.lives.entry(id).or_insert(0);
        *known = (*known).max(life);
        if self.lives.len() > self.config.departed_max {
            self.lives.pop_first();
        }
    }

    /// News delivered by broadcast.
    pub fn handle_news(&mut self, now: Time, news: LivenessNews) {
        if !self.config.enabled {
            return;
        }
        match news {
            LivenessNews::Gone { id, life, left } => {
                if id == self.me.id {
                    if !self.leaving && life <= self.life.saturating_add(1) {
                        // Cut off, not dead: a new life, and everyone told.
                        self.life = self.life.max(life).saturating_add(1);
                        self.counters.refuted += 1;
                        self.news.push(LivenessNews::Alive {
                            id: self.me.id,
                            life: self.life,
                        });
                    }
                    return;
                }
                // News older than a refutation is stale, whoever sent it (a node that left,
                // came back and refuted its old goodbye is alive).
                let known = self.lives.get(&id).copied().unwrap_or(0);
                if life >= known {
                    self.probes.remove(&id);
                    self.depart(now, id, life.max(known), left);
                }
            }
            LivenessNews::Alive { id, life } => {
                if id == self.me.id {
                    return;
                }
                self.note_life(id, life);
                if self.departed.get(&id).is_some_and(|d| d.life < life) {
                    self.departed.remove(&id);
                    self.departed_changes += 1;
                    self.events.push(LivenessEvent::Back(id));
                }
            }
        }
    }

    fn depart(&mut self, now: Time, id: NodeId, life: u64, left: bool) {
        if self.departed.contains_key(&id) {
            return;
        }
        if self.departed.len() >= self.config.departed_max {
            let oldest = self
                .departed
                .iter()
                .min_by_key(|(id, d)| (d.since, **id))
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                self.departed.remove(&oldest);
                self.departed_changes += 1;
            }
        }
        self.departed_changes += 1;
        self.departed.insert(
            id,
            Departed {
                life,
                since: now,
                left,
                told: None,
            },
        );
        self.next_forget = self.next_forget.min(now + self.config.remember);
        self.events.push(LivenessEvent::Gone(id, left));
    }

    /// When [`Liveness::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Time {
        let probe = self.probes.values().map(|p| p.deadline).min();
        let help = self.helping.values().map(|h| h.deadline).min();
        [probe, help, Some(self.next_forget)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Time::MAX)
    }

    /// Declares gone the suspects no one reached in time; forgets old departures.
    pub fn handle_timeout(&mut self, now: Time) {
        let expired: Vec<Probe> = self
            .probes
            .values()
            .filter(|p| p.deadline <= now)
            .copied()
            .collect();
        for probe in expired {
            self.probes.remove(&probe.target.id);
            let life = self.lives.get(&probe.target.id).copied().unwrap_or(0);
            self.counters.declared += 1;
            self.news.push(LivenessNews::Gone {
                id: probe.target.id,
                life,
                left: false,
            });
            self.depart(now, probe.target.id, life, false);
        }
        self.helping.retain(|_, h| h.deadline > now);
        if self.next_forget <= now {
            let remember = self.config.remember;
            let before = self.departed.len();
            self.departed.retain(|_, d| d.since + remember > now);
            self.departed_changes += (before - self.departed.len()) as u64;
            self.next_forget = self
                .departed
                .values()
                .map(|d| d.since + remember)
                .min()
                .unwrap_or(Time::MAX);
        }
    }

    /// Messages to send.
    pub fn drain_transmits(&mut self) -> std::vec::Drain<'_, (Peer, LivenessMessage)> {
        self.transmits.drain(..)
    }

    /// News to broadcast.
    pub fn drain_news(&mut self) -> std::vec::Drain<'_, LivenessNews> {
        self.news.drain(..)
    }

    /// What changed, for the layers above.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, LivenessEvent> {
        self.events.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u128) -> Peer {
        Peer::new(NodeId(n))
    }

    #[test]
    fn news_of_a_death_is_named_by_its_content() {
        let gone = |life, left| LivenessNews::Gone {
            id: NodeId(7),
            life,
            left,
        };
        assert_eq!(gone(5, false).named_id(), gone(5, false).named_id());
        assert_ne!(gone(5, false).named_id(), gone(6, false).named_id());
        assert_ne!(gone(5, false).named_id(), gone(5, true).named_id());
        assert_eq!(
            gone(5, false).named_id().map(|id| id.origin),
            Some(NodeId(7))
        );
        // A hostile life cannot overflow the name.
        assert!(gone(u64::MAX, true).named_id().is_some());
        let alive = LivenessNews::Alive {
            id: NodeId(7),
            life: 5,
        };
        assert_eq!(alive.named_id(), None);
    }

    fn liveness(n: u128) -> Liveness {
        Liveness::new(peer(n), LivenessConfig::default(), Time::from_secs(100))
    }

    #[test]
    fn a_suspect_no_one_reaches_is_declared_gone_once() {
        let mut a = liveness(1);
        let now = Time::from_secs(200);
        a.suspect(now, peer(2), &[peer(3), peer(4), peer(2)]);
        let sent: Vec<_> = a.drain_transmits().collect();
        assert_eq!(
            sent,
            vec![
                (peer(2), LivenessMessage::Ping { nonce: 1 }),
                (
                    peer(3),
                    LivenessMessage::Check {
                        target: peer(2),
                        nonce: 1
                    }
                ),
                (
                    peer(4),
                    LivenessMessage::Check {
                        target: peer(2),
                        nonce: 1
                    }
                ),
            ]
        );
        // Suspected again meanwhile: one probe only.
        a.suspect(now, peer(2), &[peer(3)]);
        assert_eq!(a.drain_transmits().count(), 0);
        let deadline = a.poll_timeout();
        assert!(
            deadline >= now + Duration::from_millis(1_000)
                && deadline < now + Duration::from_millis(1_500)
        );
        a.handle_timeout(Time::from_micros(deadline.as_micros() - 1));
        assert_eq!(a.drain_news().count(), 0, "not before its deadline");
        a.handle_timeout(deadline);
        assert_eq!(
            a.drain_news().collect::<Vec<_>>(),
            vec![LivenessNews::Gone {
                id: NodeId(2),
                life: 0,
                left: false
            }]
        );
        assert_eq!(
            a.drain_events().collect::<Vec<_>>(),
            vec![LivenessEvent::Gone(NodeId(2), false)]
        );
        assert!(a.is_departed(NodeId(2)));
        // News of the same departure from another node changes nothing.
        a.handle_news(
            now,
            LivenessNews::Gone {
                id: NodeId(2),
                life: 0,
                left: false,
            },
        );
        assert_eq!(a.drain_events().count(), 0);
    }

    #[test]
    fn a_suspect_a_helper_reaches_is_not_declared() {
        let mut a = liveness(1);
        let mut helper = liveness(3);
        let mut suspect = liveness(2);
        let now = Time::from_secs(200);
        a.suspect(now, peer(2), &[peer(3)]);
        let check = a
            .drain_transmits()
            .find(|(to, _)| *to == peer(3))
            .unwrap()
            .1;
        helper.handle_message(now, peer(1), check);
        let (to, ping) = helper.drain_transmits().next().unwrap();
        assert_eq!(to, peer(2));
        suspect.handle_message(now, peer(3), ping);
        let (_, pong) = suspect.drain_transmits().next().unwrap();
        helper.handle_message(now, peer(2), pong);
        let (to, reached) = helper.drain_transmits().next().unwrap();
        assert_eq!(to, peer(1));
        a.handle_message(now, peer(3), reached);
        a.handle_timeout(now + Duration::from_secs(5));
        assert_eq!(a.drain_news().count(), 0);
        assert!(!a.is_departed(NodeId(2)));
        assert_eq!(a.counters().refuted_by_probe, 1);
    }

    #[test]
    fn news_of_its_own_death_is_refuted_with_a_newer_life_that_revives_it_elsewhere() {
        let mut me = liveness(1);
        let mut other = liveness(2);
        let now = Time::from_secs(300);
        let gone = LivenessNews::Gone {
            id: NodeId(1),
            life: 0,
            left: false,
        };
        other.handle_news(now, gone);
        assert!(other.is_departed(NodeId(1)));
        me.handle_news(now, gone);
        let news: Vec<_> = me.drain_news().collect();
        assert_eq!(
            news,
            vec![LivenessNews::Alive {
                id: NodeId(1),
                life: 100_001
            }]
        );
        other.handle_news(now, news[0]);
        assert!(!other.is_departed(NodeId(1)));
        assert_eq!(
            other.drain_events().collect::<Vec<_>>(),
            vec![
                LivenessEvent::Gone(NodeId(1), false),
                LivenessEvent::Back(NodeId(1))
            ]
        );
        // Old news of the earlier life does not kill it again.
        other.handle_news(now, gone);
        assert!(!other.is_departed(NodeId(1)));
    }

    #[test]
    fn a_leaving_node_says_so_and_departures_are_forgotten_in_time() {
        let mut me = liveness(1);
        me.leave();
        let news: Vec<_> = me.drain_news().collect();
        assert_eq!(
            news,
            vec![LivenessNews::Gone {
                id: NodeId(1),
                life: 100_000,
                left: true
            }]
        );
        // A leaving node does not refute.
        me.handle_news(Time::from_secs(101), news[0]);
        assert_eq!(me.drain_news().count(), 0);
        let mut other = liveness(2);
        other.handle_news(Time::from_secs(101), news[0]);
        assert_eq!(
            other.departed().collect::<Vec<_>>(),
            vec![(NodeId(1), true, Time::from_secs(101))]
        );
        other.handle_timeout(Time::from_secs(101 + 600));
        assert_eq!(other.departed().count(), 0);
    }
}
