//! When to sync: kube-proxy's `BoundedFrequencyRunner` semantics, as a pure
//! state machine driven by the caller's clock (so tests are exact).
//!
//! - A requested sync runs at once if the last one was at least `min_interval`
//!   ago, else at `last + min_interval`: bursts of changes coalesce.
//! - A sync runs at least every `max_interval` even without changes
//!   (kube-proxy's `syncPeriod`), repairing anything that drifted.
//! - A failed sync is retried after `retry_interval` (never sooner than
//!   `min_interval` after the last run).
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct SyncRunner {
    min_interval: Duration,
    max_interval: Duration,
    retry_interval: Duration,
    last_run: Option<Instant>,
    requested: bool,
    retry_at: Option<Instant>,
}

impl SyncRunner {
    #[must_use]
    pub fn new(min_interval: Duration, max_interval: Duration, retry_interval: Duration) -> Self {
        Self {
            min_interval,
            max_interval,
            retry_interval,
            last_run: None,
            requested: false,
            retry_at: None,
        }
    }

    /// Something changed: a sync is wanted.
    pub fn request(&mut self) {
        self.requested = true;
    }

    #[must_use]
    pub fn pending(&self) -> bool {
        self.requested || self.retry_at.is_some()
    }

    /// When the next sync should run, seen at `now` (`None` = nothing
    /// scheduled: no run has happened yet and none was requested).
    #[must_use]
    pub fn next_run(&self, now: Instant) -> Option<Instant> {
        let earliest = self.last_run.map_or(now, |t| (t + self.min_interval).max(now));
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if self.requested {
            consider(earliest);
        }
        if let Some(r) = self.retry_at {
            consider(r.max(earliest));
        }
        if let Some(last) = self.last_run {
            consider((last + self.max_interval).max(earliest));
        }
        next
    }

    /// Whether a sync is due at `now`.
    #[must_use]
    pub fn due(&self, now: Instant) -> bool {
        self.next_run(now).is_some_and(|t| t <= now)
    }

    /// Records a sync that ran at `now`; `ok = false` schedules a retry.
    pub fn ran(&mut self, now: Instant, ok: bool) {
        self.last_run = Some(now);
        self.requested = false;
        self.retry_at = (!ok).then(|| now + self.retry_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);
    const RETRY: Duration = Duration::from_secs(5);

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn nothing_is_scheduled_before_the_first_request() {
        let t0 = Instant::now();
        let r = SyncRunner::new(MIN, MAX, RETRY);
        assert_eq!(r.next_run(t0), None);
        assert!(!r.due(at(t0, 100_000)));
    }

    #[test]
    fn the_first_request_runs_at_once() {
        let t0 = Instant::now();
        let mut r = SyncRunner::new(MIN, MAX, RETRY);
        r.request();
        assert_eq!(r.next_run(t0), Some(t0));
        assert!(r.due(t0));
    }

    #[test]
    fn requests_within_min_interval_coalesce_into_one_run_at_last_plus_min() {
        let t0 = Instant::now();
        let mut r = SyncRunner::new(MIN, MAX, RETRY);
        r.request();
        r.ran(t0, true);
        r.request();
        r.request();
        assert!(!r.due(at(t0, 200)));
        assert_eq!(r.next_run(at(t0, 200)), Some(at(t0, 1000)));
        assert!(r.due(at(t0, 1000)));
        r.ran(at(t0, 1000), true);
        assert!(!r.pending());
    }

    #[test]
    fn a_request_after_a_quiet_period_runs_immediately() {
        let t0 = Instant::now();
        let mut r = SyncRunner::new(MIN, MAX, RETRY);
        r.request();
        r.ran(t0, true);
        r.request();
        assert_eq!(r.next_run(at(t0, 5000)), Some(at(t0, 5000)));
    }

    #[test]
    fn without_changes_a_sync_runs_every_max_interval() {
        let t0 = Instant::now();
        let mut r = SyncRunner::new(MIN, MAX, RETRY);
        r.request();
        r.ran(t0, true);
        assert_eq!(r.next_run(at(t0, 10)), Some(at(t0, 30_000)));
        assert!(!r.due(at(t0, 29_999)));
        assert!(r.due(at(t0, 30_000)));
        r.ran(at(t0, 30_000), true);
        assert_eq!(r.next_run(at(t0, 30_001)), Some(at(t0, 60_000)));
    }

    #[test]
    fn a_failed_sync_is_retried_after_the_retry_interval() {
        let t0 = Instant::now();
        let mut r = SyncRunner::new(MIN, MAX, RETRY);
        r.request();
        r.ran(t0, false);
        assert!(r.pending());
        assert_eq!(r.next_run(at(t0, 1)), Some(at(t0, 5000)));
        // A new request comes sooner than the retry: it wins (after min).
        r.request();
        assert_eq!(r.next_run(at(t0, 1)), Some(at(t0, 1000)));
        r.ran(at(t0, 1000), true);
        assert!(!r.pending());
        assert_eq!(r.next_run(at(t0, 1001)), Some(at(t0, 31_000)));
    }

    #[test]
    fn a_retry_never_runs_sooner_than_min_interval() {
        let t0 = Instant::now();
        let mut r = SyncRunner::new(Duration::from_secs(10), MAX, Duration::from_secs(2));
        r.request();
        r.ran(t0, false);
        assert_eq!(r.next_run(at(t0, 1)), Some(at(t0, 10_000)));
    }
}
