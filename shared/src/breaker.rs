//! A circuit breaker around a dependency that may go away (Redis for the Cache service, the
//! Cache service for its clients).
//!
//! After `failure_threshold` consecutive failures it opens: calls are refused at once instead of
//! each waiting for a timeout. Once `cooldown` has passed, one call is let through as a probe
//! (half-open) while the others are still refused; its outcome closes the breaker or opens it
//! for another cooldown. A probe that is dropped without an outcome (its caller went away)
//! leaves the breaker open with the cooldown already over, so the next call probes again.

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// The breaker's state, as reported to operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cooldown has passed.
    Open,
    /// One probe call is deciding whether the dependency is back.
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "CLOSED",
            BreakerState::Open => "OPEN",
            BreakerState::HalfOpen => "HALF_OPEN",
        }
    }
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// A circuit breaker; share it behind an `Arc` (or in a struct that is).
#[derive(Debug)]
pub struct CircuitBreaker {
    name: std::borrow::Cow<'static, str>,
    failure_threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
    /// How often it has opened since it was made.
    opened: std::sync::atomic::AtomicU64,
}

/// Leave to make one call; report its outcome with [`Permit::success`] or [`Permit::failure`].
#[must_use = "report the call's outcome on the permit"]
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    decided: bool,
}

impl CircuitBreaker {
    /// A closed breaker named `name` (for its log lines).
    pub fn new(
        name: impl Into<std::borrow::Cow<'static, str>>,
        failure_threshold: u32,
        cooldown: Duration,
    ) -> Self {
        CircuitBreaker {
            name: name.into(),
            failure_threshold: failure_threshold.max(1),
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
            opened: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// A permit for one call, or `None` when the call must be skipped (open, or a probe is
    /// already running).
    pub fn acquire(&self) -> Option<Permit<'_>> {
        let mut state = self.lock();
        let probe = match *state {
            State::Closed { .. } => false,
            State::HalfOpen => return None,
            State::Open { until } if Instant::now() < until => return None,
            State::Open { .. } => {
                *state = State::HalfOpen;
                true
            }
        };
        Some(Permit {
            breaker: self,
            probe,
            decided: false,
        })
    }

    /// A permit whatever the state, for a call that must be tried even while the dependency
    /// seems down (losing it costs more than waiting for it). While the breaker is not closed
    /// the call counts as a probe: its success closes the breaker, its failure keeps it open.
    pub fn force(&self) -> Permit<'_> {
        let probe = !matches!(*self.lock(), State::Closed { .. });
        Permit {
            breaker: self,
            probe,
            decided: false,
        }
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen => BreakerState::HalfOpen,
        }
    }

    /// How many times the breaker has opened.
    pub fn times_opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        // The state is a plain value: a panic elsewhere cannot leave it half-written.
        self.state.lock()
    }

    fn record(&self, probe: bool, ok: Option<bool>) {
        let mut state = self.lock();
        match (ok, &mut *state) {
            (Some(true), State::Closed { failures }) => *failures = 0,
            (Some(true), _) if probe => {
                *state = State::Closed { failures: 0 };
                tracing::info!(
                    breaker = %self.name,
                    "circuit breaker closed: the dependency answers again"
                );
            }
            (Some(false), State::Closed { failures }) => {
                *failures += 1;
                if *failures >= self.failure_threshold {
                    let threshold = self.failure_threshold;
                    *state = State::Open {
                        until: Instant::now() + self.cooldown,
                    };
                    self.opened
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(
                        breaker = %self.name,
                        failures = threshold,
                        cooldown = ?self.cooldown,
                        "circuit breaker opened: calls are skipped until a probe succeeds"
                    );
                }
            }
            (Some(false), _) if probe => {
                *state = State::Open {
                    until: Instant::now() + self.cooldown,
                };
            }
            // A probe without an outcome: probe again on the next call.
            (None, State::HalfOpen) if probe => {
                *state = State::Open {
                    until: Instant::now(),
                };
            }
            // Outcomes of calls let through before the state changed do not move it.
            _ => {}
        }
    }
}

impl Permit<'_> {
    /// True when this call is the probe that decides whether an open breaker closes.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    pub fn success(mut self) {
        self.decided = true;
        self.breaker.record(self.probe, Some(true));
    }

    pub fn failure(mut self) {
        self.decided = true;
        self.breaker.record(self.probe, Some(false));
    }

    /// Reports `ok` as success or failure.
    pub fn record(self, ok: bool) {
        if ok { self.success() } else { self.failure() }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.decided {
            self.breaker.record(self.probe, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_only() {
        let breaker = CircuitBreaker::new("test", 3, Duration::from_secs(60));
        breaker.acquire().expect("closed").failure();
        breaker.acquire().expect("closed").failure();
        breaker.acquire().expect("closed").success();
        breaker.acquire().expect("closed").failure();
        breaker.acquire().expect("closed").failure();
        assert_eq!(breaker.state(), BreakerState::Closed);
        breaker.acquire().expect("closed").failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.acquire().is_none(), "open: calls are skipped");
        assert_eq!(breaker.times_opened(), 1);
    }

    #[test]
    fn one_probe_after_the_cooldown_decides() {
        let breaker = CircuitBreaker::new("test", 1, Duration::from_millis(20));
        breaker.acquire().expect("closed").failure();
        assert!(breaker.acquire().is_none());
        std::thread::sleep(Duration::from_millis(30));
        let probe = breaker.acquire().expect("cooldown over: a probe");
        assert!(probe.is_probe());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.acquire().is_none(), "only one probe at a time");
        probe.failure();
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(
            breaker.acquire().is_none(),
            "a failed probe restarts the cooldown"
        );
        std::thread::sleep(Duration::from_millis(30));
        breaker.acquire().expect("probe").success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(!breaker.acquire().expect("closed").is_probe());
    }

    #[test]
    fn a_dropped_probe_lets_the_next_call_probe() {
        let breaker = CircuitBreaker::new("test", 1, Duration::from_millis(10));
        breaker.acquire().expect("closed").failure();
        std::thread::sleep(Duration::from_millis(20));
        drop(breaker.acquire().expect("probe"));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.acquire().expect("probes again").is_probe());
    }
}
