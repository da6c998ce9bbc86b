//! Endpoint health: passive outlier detection from the results of real requests, and the state
//! an active check (`GET check_path`) sets.
//!
//! Passive: `eject_after` consecutive failures (connect errors, first-byte timeouts, 5xx) take
//! an endpoint out for `ejection`. When the ejection ends the endpoint takes requests again, half
//! open as a circuit breaker is: its first failure ejects it again at once, for twice as long
//! (up to `max_ejection`), while a success closes the circuit and resets both counts. Envoy's
//! outlier detection and linkerd's failure accrual work the same way; the half-open step keeps
//! a replica that is still down from costing `eject_after` failed attempts per period.
//!
//! Active: a failed check holds the endpoint out until a check passes; a passing check also ends
//! a passive ejection early (the replica answers again), without resetting the backoff.
//!
//! Times are `tokio::time::Instant`, so tests drive them with a paused clock.

use std::sync::Weak;
use std::time::Duration;

use http::{HeaderMap, Method, Request};
use http_body_util::BodyExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::pool::Pool;
use super::HttpClient;
use crate::config::PoolHealthConfig;

#[derive(Debug)]
pub(super) struct Health {
    consecutive_failures: u32,
    /// Ejections in a row without a success in between: the backoff exponent.
    ejections: u32,
    ejected_until: Option<Instant>,
    /// The last active check failed.
    check_failed: bool,
    /// Availability as last reported by [`Health::sync`].
    reported_available: bool,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
            check_failed: false,
            reported_available: true,
        }
    }
}

impl Health {
    pub(super) fn available(&self, now: Instant) -> bool {
        !self.check_failed && self.ejected_until.is_none_or(|until| now >= until)
    }

    /// The new availability when it changed since the last call: `Some(false)` once per
    /// ejection or failed check, `Some(true)` once when the endpoint is back.
    pub(super) fn sync(&mut self, now: Instant) -> Option<bool> {
        let available = self.available(now);
        (available != std::mem::replace(&mut self.reported_available, available)).then_some(available)
    }

    pub(super) fn record_success(&mut self) {
        self.consecutive_failures = 0;
        self.ejections = 0;
        self.ejected_until = None;
    }

    /// Counts a failure; returns how long the endpoint is ejected for when this one ejects it.
    pub(super) fn record_failure(&mut self, now: Instant, policy: &PoolHealthConfig) -> Option<Duration> {
        if policy.eject_after == 0 {
            return None;
        }
        if self.ejected_until.is_some_and(|until| now < until) {
            // Already out: an attempt sent just before the ejection failed too.
            return None;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let half_open = self.ejections > 0;
        if !half_open && self.consecutive_failures < policy.eject_after {
            return None;
        }
        let period = policy
            .ejection
            .saturating_mul(2u32.saturating_pow(self.ejections.min(16)))
            .min(policy.max_ejection);
        self.ejections = self.ejections.saturating_add(1);
        self.consecutive_failures = 0;
        self.ejected_until = Some(now + period);
        Some(period)
    }

    /// An active check's result: a failure holds the endpoint out until a check passes; a
    /// pass also ends a passive ejection early.
    pub(super) fn record_check(&mut self, passed: bool) {
        self.check_failed = !passed;
        if passed {
            self.ejected_until = None;
        }
    }
}

/// What an active check sends: `GET path` with the upstream's key and extra headers.
pub(super) struct Check {
    pub path: String,
    pub headers: HeaderMap,
    pub client: HttpClient,
}

/// Checks every endpoint each `check_interval`, all at once; a check passes on a 2xx within
/// `check_timeout` (body included). Ends when the pool is dropped.
pub(super) async fn run_checks(pool: Weak<Pool>, check: Check) {
    let Some((interval, timeout)) = pool.upgrade().map(|p| (p.health.check_interval, p.health.check_timeout))
    else {
        return;
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(endpoints) = pool.upgrade().map(|p| p.endpoints()) else { return };
        let mut checks = JoinSet::new();
        for endpoint in endpoints.iter().cloned() {
            let request = endpoint.origin.root_uri(&check.path).map(|uri| {
                let mut request = Request::new(crate::body::empty());
                *request.method_mut() = Method::GET;
                *request.uri_mut() = uri;
                *request.headers_mut() = check.headers.clone();
                request
            });
            let client = check.client.clone();
            checks.spawn(async move {
                let passed = match request {
                    Ok(request) => tokio::time::timeout(timeout, async {
                        let response = client.request(request).await.ok()?;
                        let status = response.status();
                        // Read to the end so the connection can be reused.
                        response.into_body().collect().await.ok()?;
                        Some(status.is_success())
                    })
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(false),
                    Err(_) => false,
                };
                (endpoint, passed)
            });
        }
        while let Some(joined) = checks.join_next().await {
            let Ok((endpoint, passed)) = joined else { continue };
            let Some(pool) = pool.upgrade() else { return };
            pool.record_check(&endpoint, passed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PoolHealthConfig {
        PoolHealthConfig {
            eject_after: 3,
            ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(30),
            ..PoolHealthConfig::default()
        }
    }

    fn fail(health: &mut Health, policy: &PoolHealthConfig) -> Option<Duration> {
        health.record_failure(Instant::now(), policy)
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_the_endpoint_returns_after_the_period() {
        let (policy, mut health) = (policy(), Health::default());
        assert_eq!(fail(&mut health, &policy), None);
        assert_eq!(fail(&mut health, &policy), None);
        assert!(health.available(Instant::now()));
        assert_eq!(health.sync(Instant::now()), None);
        assert_eq!(fail(&mut health, &policy), Some(Duration::from_secs(10)));
        assert_eq!(health.sync(Instant::now()), Some(false));
        assert_eq!(health.sync(Instant::now()), None, "reported once");
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(!health.available(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(health.available(Instant::now()));
        assert_eq!(health.sync(Instant::now()), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_between_failures_resets_the_count() {
        let (policy, mut health) = (policy(), Health::default());
        for _ in 0..10 {
            fail(&mut health, &policy);
            fail(&mut health, &policy);
            health.record_success();
        }
        assert!(health.available(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_right_after_returning_ejects_again_for_twice_as_long_up_to_the_cap() {
        let (policy, mut health) = (policy(), Health::default());
        for _ in 0..3 {
            fail(&mut health, &policy);
        }
        for expected in [20, 30, 30] {
            tokio::time::advance(health.ejected_until.unwrap() - Instant::now()).await;
            assert!(health.available(Instant::now()));
            assert_eq!(fail(&mut health, &policy), Some(Duration::from_secs(expected)));
        }
        // A success after the last period closes the circuit: ejections start at 10 s again.
        tokio::time::advance(Duration::from_secs(30)).await;
        health.record_success();
        assert_eq!(fail(&mut health, &policy), None);
        assert_eq!(fail(&mut health, &policy), None);
        assert_eq!(fail(&mut health, &policy), Some(Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_while_ejected_do_not_extend_the_ejection() {
        let (policy, mut health) = (policy(), Health::default());
        for _ in 0..3 {
            fail(&mut health, &policy);
        }
        let until = health.ejected_until;
        for _ in 0..5 {
            assert_eq!(fail(&mut health, &policy), None);
        }
        assert_eq!(health.ejected_until, until);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_check_holds_the_endpoint_out_until_a_check_passes() {
        let (policy, mut health) = (policy(), Health::default());
        health.record_check(false);
        assert_eq!(health.sync(Instant::now()), Some(false));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!health.available(Instant::now()), "no timeout ends a failed check");
        health.record_success();
        assert!(!health.available(Instant::now()), "requests do not clear a failed check");
        health.record_check(true);
        assert_eq!(health.sync(Instant::now()), Some(true));
        // A passing check also ends a passive ejection early.
        for _ in 0..3 {
            fail(&mut health, &policy);
        }
        assert!(!health.available(Instant::now()));
        health.record_check(true);
        assert!(health.available(Instant::now()));
    }

    #[test]
    fn eject_after_zero_never_ejects() {
        let policy = PoolHealthConfig { eject_after: 0, ..policy() };
        let mut health = Health::default();
        for _ in 0..100 {
            assert_eq!(fail(&mut health, &policy), None);
        }
        assert!(health.available(Instant::now()));
    }
}
