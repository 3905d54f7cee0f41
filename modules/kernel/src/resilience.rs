//! Guarding calls to something that may be slow or down: a circuit breaker, so a
//! failing dependency is failed fast instead of waited on.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Opens after `threshold` consecutive failures; after `cooldown` lets one trial
/// call through (half-open), closing again on its success.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
struct State {
    failures: u32,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            state: Mutex::new(State {
                failures: 0,
                open_until: None,
                trial_in_flight: false,
            }),
        }
    }

    /// Whether a call may go out now. While open, no; once the cooldown has passed,
    /// one trial at a time.
    pub fn allow(&self) -> bool {
        let Ok(mut s) = self.state.lock() else {
            return true;
        };
        match s.open_until {
            None => true,
            Some(until) if Instant::now() < until => false,
            Some(_) if s.trial_in_flight => false,
            Some(_) => {
                s.trial_in_flight = true;
                true
            }
        }
    }

    pub fn record_success(&self) {
        if let Ok(mut s) = self.state.lock() {
            *s = State {
                failures: 0,
                open_until: None,
                trial_in_flight: false,
            };
        }
    }

    pub fn record_failure(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.failures = s.failures.saturating_add(1);
            s.trial_in_flight = false;
            if s.failures >= self.threshold {
                s.open_until = Some(Instant::now() + self.cooldown);
            }
        }
    }

    pub fn is_open(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.open_until.is_some_and(|u| Instant::now() < u))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_a_good_trial() {
        let breaker = CircuitBreaker::new(2, Duration::from_millis(30));
        assert!(breaker.allow());
        breaker.record_failure();
        assert!(breaker.allow(), "one failure is not enough");
        breaker.record_failure();
        assert!(!breaker.allow(), "open after two");
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.allow(), "half-open: one trial");
        assert!(!breaker.allow(), "only one trial at a time");
        breaker.record_success();
        assert!(breaker.allow() && !breaker.is_open());
    }

    #[test]
    fn a_failed_trial_opens_it_again() {
        let breaker = CircuitBreaker::new(1, Duration::from_millis(20));
        breaker.record_failure();
        std::thread::sleep(Duration::from_millis(30));
        assert!(breaker.allow());
        breaker.record_failure();
        assert!(!breaker.allow());
    }
}
