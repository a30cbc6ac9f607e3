//! The delay before a supervised task is started again: exponential, capped, and reset once a
//! run lasted long enough to count as healthy.

use std::time::Duration;

/// Restart delays: `first`, doubling up to `max`; a run that lasted `reset_after` or longer
/// starts the series again at `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The delay after the first end (and after a run that lasted `reset_after`).
    pub first: Duration,
    /// The longest delay.
    pub max: Duration,
    /// A run at least this long resets the delay to `first`.
    pub reset_after: Duration,
}

impl Default for BackoffPolicy {
    /// 100 ms doubling to 30 s, reset after a minute of running: a task that fails at once is
    /// retried quickly a few times and then only twice a minute, so a persistent fault neither
    /// spins a core nor floods the log; one that failed after running well is retried at once.
    fn default() -> Self {
        BackoffPolicy {
            first: Duration::from_millis(100),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

/// The state of one task's backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
}

impl Backoff {
    /// A fresh series under `policy`.
    pub fn new(policy: BackoffPolicy) -> Backoff {
        Backoff {
            policy,
            next: policy.first,
        }
    }

    /// The delay before the next start, for a run that lasted `ran_for`.
    pub fn next(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.policy.reset_after {
            self.next = self.policy.first;
        }
        let delay = self.next.min(self.policy.max);
        self.next = (delay * 2).min(self.policy.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_reset_after_a_long_run() {
        let mut b = Backoff::new(BackoffPolicy::default());
        let quick = Duration::from_millis(5);
        let ms: Vec<u128> = (0..12).map(|_| b.next(quick).as_millis()).collect();
        assert_eq!(
            ms,
            [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
        // A run just short of a minute does not reset...
        assert_eq!(b.next(Duration::from_secs(59)), Duration::from_secs(30));
        // ...a minute does, and the series starts again.
        assert_eq!(b.next(Duration::from_secs(60)), Duration::from_millis(100));
        assert_eq!(b.next(quick), Duration::from_millis(200));
    }

    #[test]
    fn a_policy_whose_first_delay_exceeds_the_cap_waits_the_cap() {
        let mut b = Backoff::new(BackoffPolicy {
            first: Duration::from_secs(10),
            max: Duration::from_secs(1),
            reset_after: Duration::from_secs(60),
        });
        assert_eq!(b.next(Duration::ZERO), Duration::from_secs(1));
        assert_eq!(b.next(Duration::ZERO), Duration::from_secs(1));
    }
}
