//! Versions of values: a hybrid logical clock plus the writer's id, so that every write has a
//! version no older than anything its writer has seen, and any two writes are ordered
//! (last writer wins).

use serde::{Deserialize, Serialize};

use crate::id::NodeId;
use crate::time::Time;

/// The version of a write. Ordered by physical milliseconds, then logical counter, then writer:
/// a total order, so replicas that saw the same writes agree on the winner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    /// Milliseconds of the writer's clock (or later, if it had seen a later version).
    pub millis: u64,
    /// Tie-breaker among writes in one millisecond.
    pub counter: u32,
    /// Who wrote.
    pub writer: NodeId,
}

impl Version {
    /// A fingerprint of `(key, version)`, the unit replicas compare in anti-entropy.
    pub fn fingerprint(&self, key: &[u8]) -> u64 {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&(key.len() as u64).to_le_bytes());
        hasher.update(key);
        hasher.update(&self.millis.to_le_bytes());
        hasher.update(&self.counter.to_le_bytes());
        hasher.update(&self.writer.0.to_le_bytes());
        let hash = hasher.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_le_bytes(first)
    }
}

/// A hybrid logical clock (Kulkarni et al., 2014): physical time when it moves forward, a
/// counter when it does not, and never behind any version this node has seen.
///
/// The driver's [`Time`] is the physical clock: wall-clock based in the agent, simulated in
/// the simulator. Versions only need to be comparable across nodes roughly; the counter and
/// [`Clock::observe`] make causally later writes win regardless of clock skew.
#[derive(Clone, Debug)]
pub struct Clock {
    me: NodeId,
    millis: u64,
    counter: u32,
}

impl Clock {
    /// A clock for writes by `me`.
    pub fn new(me: NodeId) -> Clock {
        Clock {
            me,
            millis: 0,
            counter: 0,
        }
    }

    /// A version for a new write at `now`, later than every version issued or observed.
    pub fn tick(&mut self, now: Time) -> Version {
        let physical = now.as_micros() / 1000;
        if physical > self.millis {
            self.millis = physical;
            self.counter = 0;
        } else if self.counter == u32::MAX {
            self.millis += 1;
            self.counter = 0;
        } else {
            self.counter += 1;
        }
        Version {
            millis: self.millis,
            counter: self.counter,
            writer: self.me,
        }
    }

    /// Moves the clock past `seen`, so that this node's next write is newer.
    pub fn observe(&mut self, seen: Version) {
        if (seen.millis, seen.counter) > (self.millis, self.counter) {
            self.millis = seen.millis;
            self.counter = seen.counter;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_time_then_counter_then_writer() {
        let v = |millis, counter, writer| Version {
            millis,
            counter,
            writer: NodeId(writer),
        };
        assert!(v(2, 0, 1) > v(1, 9, 9));
        assert!(v(1, 2, 1) > v(1, 1, 9));
        assert!(v(1, 1, 2) > v(1, 1, 1));
        assert_ne!(v(1, 1, 1).fingerprint(b"a"), v(1, 1, 1).fingerprint(b"b"));
        assert_ne!(v(1, 1, 1).fingerprint(b"a"), v(1, 1, 2).fingerprint(b"a"));
    }

    #[test]
    fn the_clock_never_goes_back_and_passes_what_it_saw() {
        let mut clock = Clock::new(NodeId(7));
        let a = clock.tick(Time::from_millis(100));
        let b = clock.tick(Time::from_millis(100));
        let c = clock.tick(Time::from_millis(50));
        assert_eq!((a.millis, a.counter), (100, 0));
        assert_eq!((b.millis, b.counter), (100, 1));
        assert_eq!((c.millis, c.counter), (100, 2), "a clock that went back");
        clock.observe(Version {
            millis: 5_000,
            counter: 3,
            writer: NodeId(9),
        });
        let d = clock.tick(Time::from_millis(200));
        assert_eq!((d.millis, d.counter, d.writer), (5_000, 4, NodeId(7)));
        let e = clock.tick(Time::from_millis(6_000));
        assert_eq!((e.millis, e.counter), (6_000, 0));
    }
}
