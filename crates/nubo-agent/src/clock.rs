//! The agent's clock: the time the protocol core is given.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nubo_proto::Time;
use tokio::time::Instant;

/// Microseconds since the Unix epoch, read once at start and advanced by the monotonic clock,
/// so the core's time never goes backwards even if the wall clock is stepped.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
    start_unix_micros: u64,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Clock {
        Clock {
            start: Instant::now(),
            start_unix_micros: unix_now().as_micros() as u64,
        }
    }

    /// The core's time now.
    pub fn now(&self) -> Time {
        self.time_at(Instant::now())
    }

    /// The core's time at `instant`.
    pub fn time_at(&self, instant: Instant) -> Time {
        let elapsed = instant.saturating_duration_since(self.start).as_micros() as u64;
        Time::from_micros(self.start_unix_micros + elapsed)
    }

    /// The instant at which the core's time will be `time` (now, if it has passed).
    pub fn instant_of(&self, time: Time) -> Instant {
        let micros = time.as_micros().saturating_sub(self.start_unix_micros);
        // `Time::MAX` means never: a day away is as good and does not overflow.
        let span = Duration::from_micros(micros.min(86_400_000_000));
        self.start + span
    }

    /// Seconds since the agent started.
    pub fn uptime(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Time since the Unix epoch from the wall clock.
pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}
