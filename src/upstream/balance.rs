//! Balancing a request with no affinity over a pool's eligible endpoints: power of two random
//! choices (p2c) over requests in flight or over a peak-EWMA latency cost, or round robin.
//!
//! This is tower's `balance::p2c` + `load::PeakEwma` idea in a few lines rather than tower's
//! `Balance` service: `Balance` owns its endpoints as services behind `poll_ready` and picks one
//! per call, but a pool also has to rank endpoints by affinity key, skip the endpoints a
//! request already failed on, and skip ejected ones, none of which `Balance` can be asked to
//! do. The estimator below follows `tower::load::peak_ewma` (same update rule and cost) so the
//! behaviour is the well-studied one (Finagle, linkerd).

use std::time::Duration;

use tokio::time::Instant;

/// How loaded an endpoint looks to the balancer.
#[derive(Clone, Copy, Debug)]
pub(super) struct Load {
    pub in_flight: usize,
    /// Peak-EWMA latency estimate in seconds.
    pub latency: f64,
}

impl Load {
    fn least_requests_cost(self) -> f64 {
        self.in_flight as f64
    }

    /// tower's peak-EWMA cost: the latency estimate scaled by the work already queued.
    fn peak_ewma_cost(self) -> f64 {
        self.latency * (self.in_flight as f64 + 1.0)
    }
}

/// The cheaper of two distinct random indices into `loads` (by `peak_ewma` or in-flight cost);
/// `None` when `loads` is empty.
pub(super) fn p2c(loads: &[Load], peak_ewma: bool, mut random: impl FnMut(usize) -> usize) -> Option<usize> {
    let cost = |i: usize| if peak_ewma { loads[i].peak_ewma_cost() } else { loads[i].least_requests_cost() };
    match loads.len() {
        0 => None,
        1 => Some(0),
        n => {
            // Two distinct indices, uniformly (Floyd's sampling for k = 2).
            let a = random(n);
            let mut b = random(n - 1);
            if b >= a {
                b += 1;
            }
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

/// Peak-EWMA latency estimate (tower's `RttEstimate`): a sample above the estimate replaces it
/// at once (the peak); lower samples pull it down with weight `1 - e^(-elapsed/decay)`, so an
/// endpoint that turned slow is avoided immediately and trusted again only gradually.
#[derive(Debug)]
pub(super) struct PeakEwma {
    estimate: f64,
    updated: Instant,
}

/// tower's and linkerd's default decay.
pub(super) const DECAY: Duration = Duration::from_secs(10);

impl PeakEwma {
    pub(super) fn new(initial: Duration, now: Instant) -> Self {
        Self { estimate: initial.as_secs_f64(), updated: now }
    }

    pub(super) fn observe(&mut self, sample: Duration, now: Instant) {
        let sample = sample.as_secs_f64();
        if sample > self.estimate {
            self.estimate = sample;
        } else {
            let weight = self.decay_weight(now);
            self.estimate = self.estimate * weight + sample * (1.0 - weight);
        }
        self.updated = now;
    }

    /// The estimate now. As in tower, reading it decays it toward zero by the time since the
    /// last update, so an endpoint that has been idle a while looks cheap again.
    pub(super) fn estimate(&mut self, now: Instant) -> f64 {
        self.observe(Duration::ZERO, now);
        self.estimate
    }

    fn decay_weight(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (-elapsed / DECAY.as_secs_f64()).exp()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(in_flight: usize, latency: f64) -> Load {
        Load { in_flight, latency }
    }

    #[test]
    fn p2c_takes_the_less_loaded_of_its_two_samples() {
        let loads = [load(5, 0.1), load(1, 0.1), load(9, 0.1)];
        // Samples 0 and 2 (random(3) = 0, random(2) = 1 → 2): 0 has fewer in flight.
        let mut draws = [0, 1].into_iter();
        assert_eq!(p2c(&loads, false, |_| draws.next().unwrap()), Some(0));
        // Samples 2 and 1: 1.
        let mut draws = [2, 1].into_iter();
        assert_eq!(p2c(&loads, false, |_| draws.next().unwrap()), Some(1));
        assert_eq!(p2c(&loads[..1], false, |_| unreachable!()), Some(0));
        assert_eq!(p2c(&[], false, |_| unreachable!()), None);
    }

    #[test]
    fn p2c_never_picks_the_most_loaded_of_three_and_spreads_over_the_rest() {
        let loads = [load(0, 0.1), load(0, 0.1), load(10, 0.1)];
        let mut picks = [0usize; 3];
        for _ in 0..3000 {
            picks[p2c(&loads, false, |n| fastrand::usize(..n)).unwrap()] += 1;
        }
        assert_eq!(picks[2], 0, "{picks:?}");
        assert!(picks[0] > 1000 && picks[1] > 1000, "{picks:?}");
    }

    #[test]
    fn peak_ewma_weighs_latency_by_queued_work() {
        // A slow idle endpoint (1 s × 1) beats a fast busy one (0.1 s × 11).
        let loads = [load(0, 1.0), load(10, 0.1)];
        let mut draws = [1, 0].into_iter();
        assert_eq!(p2c(&loads, true, |_| draws.next().unwrap()), Some(0));
        // By requests alone the fast one would lose too; equal work: the faster one wins.
        let loads = [load(2, 1.0), load(2, 0.1)];
        let mut draws = [0, 0].into_iter();
        assert_eq!(p2c(&loads, true, |_| draws.next().unwrap()), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_estimate_jumps_to_a_peak_and_decays_back_gradually() {
        let mut ewma = PeakEwma::new(Duration::from_millis(100), Instant::now());
        ewma.observe(Duration::from_secs(2), Instant::now());
        assert_eq!(ewma.estimate(Instant::now()), 2.0, "a slower sample replaces the estimate at once");
        // Idle for one decay period: down to 1/e of the peak.
        tokio::time::advance(DECAY).await;
        let decayed = ewma.estimate(Instant::now());
        assert!((decayed - 2.0 * (-1.0f64).exp()).abs() < 1e-9, "{decayed}");
        // A new peak, then a fast sample soon after barely moves it.
        ewma.observe(Duration::from_secs(3), Instant::now());
        tokio::time::advance(Duration::from_millis(10)).await;
        ewma.observe(Duration::from_millis(100), Instant::now());
        let estimate = ewma.estimate(Instant::now());
        assert!(estimate > 2.99 && estimate < 3.0, "{estimate}");
    }
}
