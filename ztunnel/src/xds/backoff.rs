//! Reconnect delays: exponential with jitter, capped, reset after a successful response.

use std::time::Duration;

use rand::Rng;

// Short enough that a restarted control plane is found again at once; capped like upstream so a
// long outage is retried every few seconds without hammering the server.
const DEFAULT_INITIAL: Duration = Duration::from_millis(100);
const DEFAULT_MAX: Duration = Duration::from_secs(15);

/// Exponential backoff: the bound doubles after every failure up to `max`, and each delay is
/// drawn between half the bound and the bound, so ztunnels restarted together spread out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_INITIAL, DEFAULT_MAX)
    }
}

impl Backoff {
    /// Delays starting at `initial` and never above `max` (`max` is raised to `initial` if lower).
    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Self {
            initial,
            max,
            current: initial,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let bound = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = bound / 2;
        half + rand::rng().random_range(Duration::ZERO..=bound - half)
    }

    /// Back to the initial delay (after a successful response).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_bounded_and_reset() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(15));
        let mut b = Backoff::new(initial, max);
        let first = b.next_delay();
        assert!(first >= initial / 2 && first <= initial, "{first:?}");
        let delays: Vec<_> = (0..40).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= max), "{delays:?}");
        // After enough failures every delay is between max/2 and max.
        assert!(delays[20..].iter().all(|d| *d >= max / 2), "{delays:?}");
        b.reset();
        assert!(b.next_delay() <= initial);
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            seen.insert(b.next_delay());
        }
        assert!(seen.len() > 1, "{seen:?}");
    }

    #[test]
    fn a_max_below_initial_is_raised() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert!(b.next_delay() <= Duration::from_secs(2));
    }
}
