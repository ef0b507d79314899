//! Time as the core sees it: a number handed in by the driver, never read from a clock.

use core::fmt;
use core::ops::{Add, AddAssign};
use core::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in time, in microseconds, as given to the core by its driver.
///
/// Contract for drivers: successive `now` values given to one [`crate::Node`] never go
/// backwards. The real agent passes microseconds since the Unix epoch (taken once at start and
/// advanced by a monotonic clock), so times carried in messages can be compared loosely across
/// nodes; the simulator passes its virtual clock. The core never reads a clock itself.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Time(u64);

impl Time {
    /// The origin of time.
    pub const ZERO: Time = Time(0);
    /// The largest representable time; used as "never".
    pub const MAX: Time = Time(u64::MAX);

    /// A time from microseconds since the driver's origin.
    pub const fn from_micros(micros: u64) -> Time {
        Time(micros)
    }

    /// A time from milliseconds since the driver's origin.
    pub const fn from_millis(millis: u64) -> Time {
        Time(millis.saturating_mul(1_000))
    }

    /// A time from seconds since the driver's origin.
    pub const fn from_secs(secs: u64) -> Time {
        Time(secs.saturating_mul(1_000_000))
    }

    /// Microseconds since the driver's origin.
    pub const fn as_micros(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }

    /// `self` moved back by `span`, stopping at [`Time::ZERO`].
    pub fn saturating_sub(self, span: Duration) -> Time {
        Time(self.0.saturating_sub(micros_of(span)))
    }
}

/// Whole microseconds in `span`, saturating.
fn micros_of(span: Duration) -> u64 {
    u64::try_from(span.as_micros()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, span: Duration) -> Time {
        Time(self.0.saturating_add(micros_of(span)))
    }
}

impl AddAssign<Duration> for Time {
    fn add_assign(&mut self, span: Duration) {
        *self = *self + span;
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        let t = Time::from_millis(5);
        assert_eq!((t + Duration::from_millis(3)).as_micros(), 8_000);
        assert_eq!(t.saturating_since(Time::from_millis(7)), Duration::ZERO);
        assert_eq!(t.saturating_sub(Duration::from_secs(1)), Time::ZERO);
        assert_eq!(Time::MAX + Duration::from_secs(1), Time::MAX);
        assert_eq!(Time::from_micros(1_500_000).to_string(), "1.500000s");
    }
}
