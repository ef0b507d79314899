//! The event queue: a calendar queue (a wheel of one-millisecond buckets) in front of a heap.
//!
//! Almost every event of a simulated cloud is due within a few seconds (a message a few tens
//! of milliseconds ahead, a timer a second ahead), and there are millions of them. A binary
//! heap pays a logarithmic, cache-missing sift for each; the wheel appends to a bucket and
//! sorts each bucket once when its millisecond comes. Events further ahead than the wheel
//! spans wait in a heap. Order is exactly that of a heap: by time, then by insertion.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use nubo_proto::Time;

/// A queued event: when, in which order, and a handle to what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// When the event is due.
    pub at: Time,
    /// Insertion order, to break ties.
    pub seq: u64,
    /// The caller's handle of the event.
    pub slot: u32,
}

const BUCKET_MICROS: u64 = 1_000;
const WHEEL: usize = 1 << 14;

/// A priority queue of [`Entry`] ordered by `(at, seq)`, for times that never go backwards
/// past the last popped entry.
pub struct CalendarQueue {
    buckets: Vec<Vec<Entry>>,
    /// The bucket being drained, sorted so that the next entry is last.
    current: Vec<Entry>,
    /// Millisecond of the bucket in `current`.
    cursor: u64,
    /// Entries in `buckets` (not counting `current`).
    in_wheel: usize,
    far: BinaryHeap<Reverse<Entry>>,
}

impl Default for CalendarQueue {
    fn default() -> Self {
        CalendarQueue {
            buckets: vec![Vec::new(); WHEEL],
            current: Vec::new(),
            cursor: 0,
            in_wheel: 0,
            far: BinaryHeap::new(),
        }
    }
}

impl CalendarQueue {
    /// Adds an entry.
    pub fn push(&mut self, entry: Entry) {
        let bucket = entry.at.as_micros() / BUCKET_MICROS;
        if bucket <= self.cursor {
            // Due in (or, after a peek moved on, before) the bucket being drained.
            let position = self
                .current
                .partition_point(|e| (e.at, e.seq) > (entry.at, entry.seq));
            self.current.insert(position, entry);
        } else if bucket - self.cursor < WHEEL as u64 {
            self.buckets[(bucket as usize) % WHEEL].push(entry);
            self.in_wheel += 1;
        } else {
            self.far.push(Reverse(entry));
        }
    }

    /// The earliest entry, without removing it.
    pub fn peek(&mut self) -> Option<Entry> {
        self.fill_current();
        self.current.last().copied()
    }

    /// Removes and returns the earliest entry.
    pub fn pop(&mut self) -> Option<Entry> {
        self.fill_current();
        self.current.pop()
    }

    /// Makes `current` hold the earliest bucket that has entries, if any.
    fn fill_current(&mut self) {
        while self.current.is_empty() {
            if self.in_wheel == 0 {
                // Nothing within the wheel: jump straight to the first far entry.
                let Some(Reverse(first)) = self.far.peek() else {
                    return;
                };
                self.cursor = (first.at.as_micros() / BUCKET_MICROS).max(self.cursor + 1) - 1;
            }
            self.cursor += 1;
            self.admit_far();
            let bucket = &mut self.buckets[(self.cursor as usize) % WHEEL];
            if bucket.is_empty() {
                continue;
            }
            // Taken, not swapped: a swap would hand the drained bucket's capacity on to the
            // next, until every bucket of the wheel kept the largest burst's (a 5,000-node
            // run held 0.8 GiB of empty buckets).
            self.current = std::mem::take(bucket);
            self.in_wheel -= self.current.len();
            self.current
                .sort_unstable_by_key(|e| Reverse((e.at, e.seq)));
        }
    }

    /// Moves far entries that now fall within the wheel into their buckets.
    fn admit_far(&mut self) {
        while let Some(Reverse(first)) = self.far.peek() {
            let bucket = first.at.as_micros() / BUCKET_MICROS;
            if bucket >= self.cursor + WHEEL as u64 {
                break;
            }
            let Some(Reverse(entry)) = self.far.pop() else {
                break;
            };
            if bucket <= self.cursor {
                let position = self
                    .current
                    .partition_point(|e| (e.at, e.seq) > (entry.at, entry.seq));
                self.current.insert(position, entry);
            } else {
                self.buckets[(bucket as usize) % WHEEL].push(entry);
                self.in_wheel += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nubo_proto::Rng;

    #[test]
    fn pops_in_time_then_insertion_order_like_a_heap() {
        let mut rng = Rng::from_seed(5);
        let mut queue = CalendarQueue::default();
        let mut heap = BinaryHeap::new();
        let mut now = 0u64;
        let mut seq = 0;
        for round in 0..200_000u32 {
            if round % 3 != 2 {
                // Mostly near events, some far ones, some at the same microsecond.
                let ahead = match rng.below(10) {
                    0 => rng.below(60_000_000),
                    1 => 0,
                    _ => rng.below(50_000),
                };
                seq += 1;
                let entry = Entry {
                    at: Time::from_micros(now + ahead),
                    seq,
                    slot: round,
                };
                queue.push(entry);
                heap.push(Reverse(entry));
            } else {
                let a = queue.pop();
                let b = heap.pop().map(|Reverse(e)| e);
                assert_eq!(a, b);
                if let Some(e) = a {
                    now = e.at.as_micros();
                }
            }
        }
        while let Some(Reverse(expected)) = heap.pop() {
            assert_eq!(queue.pop(), Some(expected));
        }
        assert_eq!(queue.pop(), None);
    }

    #[test]
    fn an_event_pushed_after_a_peek_moved_ahead_still_comes_first() {
        let mut queue = CalendarQueue::default();
        queue.push(Entry {
            at: Time::from_millis(500),
            seq: 1,
            slot: 1,
        });
        assert_eq!(queue.peek().map(|e| e.slot), Some(1));
        queue.push(Entry {
            at: Time::from_millis(20),
            seq: 2,
            slot: 2,
        });
        assert_eq!(queue.pop().map(|e| e.slot), Some(2));
        assert_eq!(queue.pop().map(|e| e.slot), Some(1));
    }
}
