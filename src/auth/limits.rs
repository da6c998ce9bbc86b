//! Per-key limits: requests per minute with a burst, tokens per minute, and requests in flight.
//!
//! Rates are GCRA (a theoretical arrival time per key and limit). On one replica they are
//! counted in-process by [`Gcra`] cells, which can give back as well as take: a token charge is
//! corrected once the upstream's `usage` is known, and a request refused for its model (403)
//! is refunded, so a key cannot spend its rate on requests it may not make. Across
//! replicas they are counted in Redis by one Lua script per check, atomic on the server and
//! timed by the server's clock; each key's counters share a hash tag, so one Cluster slot. The
//! local request limiter still runs first as a pre-check: a replica that alone is over a key's
//! rate refuses without a round trip. When Redis does not answer within `rate_limits.timeout`,
//! the replica decides alone, says so in metrics and logs, and tries Redis again a second later.
//!
//! Requests in flight are counted per replica: a cluster-wide count would need leases that
//! outlive crashed replicas, for a limit whose purpose (protecting a replica's connections) is
//! local anyway.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::redis_conn::RedisConn;
use redis::Script;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::keys::KeyPolicy;
use crate::config::KeyLimits;
use crate::error::{GatewayError, LimitKind};
use crate::openai::Usage;
use crate::telemetry::{KeyKindLabel, KeyLimitLabel, Metrics};

/// While Redis is failing, it is tried again this often; checks in between are local.
const REDIS_RETRY: Duration = Duration::from_secs(1);

/// One GCRA cell that can also be credited: `cost` units at `per` each, at most `capacity`
/// units ahead of now.
#[derive(Debug)]
struct Gcra {
    per: Duration,
    capacity: u32,
    tat: Mutex<Instant>,
}

impl Gcra {
    fn per_minute(rate: NonZeroU32, capacity: NonZeroU32) -> Self {
        Self {
            per: Duration::from_secs(60) / rate.get(),
            capacity: capacity.get(),
            tat: Mutex::new(Instant::now()),
        }
    }

    /// Takes `cost` units, or says how long until they fit.
    fn check(&self, cost: u64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let next = (*tat).max(now) + self.span(cost);
        let limit = now + self.span(u64::from(self.capacity));
        if next > limit {
            return Err(next - limit);
        }
        *tat = next;
        Ok(())
    }

    /// Adds `delta` units without checking (a correction): negative gives units back, never
    /// past now.
    fn adjust(&self, delta: i64) {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let base = (*tat).max(now);
        *tat = if delta >= 0 {
            base + self.span(delta.unsigned_abs())
        } else {
            base.checked_sub(self.span(delta.unsigned_abs())).map_or(now, |t| t.max(now))
        };
    }

    fn span(&self, units: u64) -> Duration {
        self.per.saturating_mul(u32::try_from(units).unwrap_or(u32::MAX))
    }
}

/// One key's in-process state. Rebuilt when the key's limits change (keys held in Redis).
#[derive(Debug)]
struct LocalState {
    limits: KeyLimits,
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
    concurrent: Option<Arc<Semaphore>>,
}

impl LocalState {
    fn new(limits: KeyLimits) -> Self {
        let requests =
            limits.requests_per_minute.map(|rpm| Gcra::per_minute(rpm, limits.burst.unwrap_or(rpm)));
        let tokens = limits.tokens_per_minute.map(|tpm| Gcra::per_minute(tpm, tpm));
        let concurrent = limits.max_concurrent.map(|n| Arc::new(Semaphore::new(n.get() as usize)));
        Self { limits, requests, tokens, concurrent }
    }

    fn check_request(&self) -> Result<(), Duration> {
        self.requests.as_ref().map_or(Ok(()), |cell| cell.check(1))
    }
}

/// KEYS[1] request TAT, KEYS[2] token TAT (ms on the server's clock).
/// ARGV[1] ms per request (0: no request limit), ARGV[2] request burst,
/// ARGV[3] ms per token (0: no token limit), ARGV[4] token capacity, ARGV[5] tokens to take.
/// Returns {0} when admitted (both cells advanced), else {limit (1 requests, 2 tokens), ms to
/// wait} with nothing written.
const CHECK: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local function advance(key, per, capacity, cost)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local next = tat + per * cost
  return next, next - now - per * capacity
end
local writes = {}
local per, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
if per > 0 then
  local next, over = advance(KEYS[1], per, capacity, 1)
  if over > 0 then return {1, math.ceil(over)} end
  writes[#writes + 1] = {KEYS[1], next}
end
per, capacity = tonumber(ARGV[3]), tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
if per > 0 and cost > 0 then
  local next, over = advance(KEYS[2], per, capacity, cost)
  if over > 0 then return {2, math.ceil(over)} end
  writes[#writes + 1] = {KEYS[2], next}
end
for _, w in ipairs(writes) do
  redis.call('SET', w[1], string.format('%.3f', w[2]), 'PX', math.ceil(w[2] - now) + 1000)
end
return {0}
";

/// KEYS[1] token TAT; ARGV[1] ms per token; ARGV[2] tokens to add (negative gives back).
const CORRECT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
tat = tat + tonumber(ARGV[1]) * tonumber(ARGV[2])
if tat <= now then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
return 1
";

struct SharedLimits {
    conn: RedisConn,
    prefix: String,
    timeout: Duration,
    check: Script,
    correct: Script,
    /// Set while Redis is failing: until then checks are local.
    retry_at: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl SharedLimits {
    /// Both cells of a key share the hash tag `{name}`.
    fn keys(&self, name: &str) -> (String, String) {
        (format!("{}rl:{{{name}}}:req", self.prefix), format!("{}rl:{{{name}}}:tok", self.prefix))
    }
}

/// What a rate check in Redis said.
enum Shared {
    Admitted,
    Refused(LimitKind, Duration),
    /// No shared store, or it did not answer: the replica decides.
    Local,
}

#[derive(Debug)]
pub struct Limiter {
    local: Mutex<HashMap<String, Arc<LocalState>>>,
    shared: Option<SharedLimits>,
    metrics: Arc<Metrics>,
}

impl Limiter {
    /// `shared`: the Redis connection and key prefix for limits across replicas, if any.
    pub fn new(shared: Option<(RedisConn, String, Duration)>, metrics: Arc<Metrics>) -> Self {
        let shared = shared.map(|(conn, prefix, timeout)| SharedLimits {
            conn,
            prefix,
            timeout,
            check: Script::new(CHECK),
            correct: Script::new(CORRECT),
            retry_at: Mutex::new(None),
        });
        Self { local: Mutex::new(HashMap::new()), shared, metrics }
    }

    /// Admits a request of `key`: a slot among its requests in flight (held by the returned
    /// permit until the response ends) and one request of its rate.
    pub async fn admit(&self, key: &KeyPolicy) -> Result<Admission, GatewayError> {
        let local = self.local(key);
        let permit = match &local.concurrent {
            Some(slots) => Some(
                slots
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| self.refuse(key, LimitKind::Concurrency, Duration::from_secs(1)))?,
            ),
            None => None,
        };
        let Some(rpm) = key.limits.requests_per_minute else {
            return Ok(Admission { permit, rate: None });
        };
        if let Err(wait) = local.check_request() {
            if self.shared.is_some() {
                self.metrics.limits.prechecked.inc();
            }
            return Err(self.refuse(key, LimitKind::Requests, wait));
        }
        let burst = key.limits.burst.unwrap_or(rpm);
        let shared = match self.check_shared(&key.name, Some((rpm, burst)), None).await {
            Shared::Refused(kind, wait) => {
                // Not admitted: the local pre-check's cell must not count it either.
                if let Some(cell) = &local.requests {
                    cell.adjust(-1);
                }
                return Err(self.refuse(key, kind, wait));
            }
            Shared::Admitted => true,
            // Local: the local cell above has decided.
            Shared::Local => false,
        };
        Ok(Admission { permit, rate: Some(RateTaken { local, shared, rpm }) })
    }

    /// Gives back the request `admission` took from `key`'s rate: the request was refused
    /// before any work (a model outside the key's list).
    pub async fn refund(&self, key: &KeyPolicy, admission: &Admission) {
        let Some(taken) = &admission.rate else { return };
        if let Some(cell) = &taken.local.requests {
            cell.adjust(-1);
        }
        let Some(shared) = self.shared.as_ref().filter(|_| taken.shared) else { return };
        let mut conn = shared.conn.clone();
        let mut invocation = shared.correct.prepare_invoke();
        invocation.key(shared.keys(&key.name).0).arg(per_ms(taken.rpm)).arg(-1);
        // Best effort: a lost refund leaves the request counted.
        let _ = tokio::time::timeout(shared.timeout, invocation.invoke_async::<i64>(&mut conn)).await;
    }

    /// Takes `estimate` prompt tokens from `key`'s tokens per minute. The returned charge is
    /// corrected with the upstream's `usage` when it is dropped.
    pub async fn charge_tokens(
        self: &Arc<Self>,
        key: &Arc<KeyPolicy>,
        estimate: u64,
    ) -> Result<Option<TokenCharge>, GatewayError> {
        let Some(tpm) = key.limits.tokens_per_minute else {
            return Ok(None);
        };
        let local = self.local(key);
        let shared = match self.check_shared(&key.name, None, Some((tpm, estimate))).await {
            Shared::Admitted => true,
            Shared::Refused(kind, wait) => {
                // Not admitted: the local pre-check's cell must not count it either.
                if let Some(cell) = &local.requests {
                    cell.adjust(-1);
                }
                return Err(self.refuse(key, kind, wait));
            }
            Shared::Local => {
                if let Some(cell) = &local.tokens {
                    cell.check(estimate).map_err(|wait| self.refuse(key, LimitKind::Tokens, wait))?;
                }
                false
            }
        };
        Ok(Some(TokenCharge {
            limiter: self.clone(),
            key: key.clone(),
            local,
            shared,
            estimate,
            used: AtomicU64::new(0),
            seen: AtomicBool::new(false),
        }))
    }

    fn local(&self, key: &KeyPolicy) -> Arc<LocalState> {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        match local.get(&key.name) {
            Some(state) if state.limits == key.limits => state.clone(),
            _ => {
                let state = Arc::new(LocalState::new(key.limits));
                local.insert(key.name.clone(), state.clone());
                state
            }
        }
    }

    fn refuse(&self, key: &KeyPolicy, limit: LimitKind, retry_after: Duration) -> GatewayError {
        let label = match limit {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Concurrency => "concurrency",
        };
        self.metrics
            .limits
            .rate_limited
            .get_or_create(&KeyLimitLabel { key: key.name.clone(), limit: label })
            .inc();
        GatewayError::RateLimited { key: key.name.clone(), limit, retry_after }
    }

    /// One round trip to Redis for a request and/or a token check; [`Shared::Local`] without a
    /// shared store or while it is failing.
    async fn check_shared(
        &self,
        name: &str,
        requests: Option<(NonZeroU32, NonZeroU32)>,
        tokens: Option<(NonZeroU32, u64)>,
    ) -> Shared {
        let Some(shared) = &self.shared else {
            return Shared::Local;
        };
        if self.degraded(shared) {
            self.metrics.limits.fallbacks.inc();
            return Shared::Local;
        }
        let (req_key, tok_key) = shared.keys(name);
        let (req_per, burst) = requests.map_or((0.0, 0), |(rpm, burst)| (per_ms(rpm), burst.get()));
        let (tok_per, capacity, cost) =
            tokens.map_or((0.0, 0, 0), |(tpm, cost)| (per_ms(tpm), tpm.get(), cost));
        let mut conn = shared.conn.clone();
        let mut invocation = shared.check.prepare_invoke();
        invocation.key(req_key).key(tok_key).arg(req_per).arg(burst).arg(tok_per).arg(capacity).arg(cost);
        let answer =
            tokio::time::timeout(shared.timeout, invocation.invoke_async::<Vec<i64>>(&mut conn)).await;
        match answer {
            Ok(Ok(answer)) => {
                self.recovered(shared);
                match answer.as_slice() {
                    [1, wait] => Shared::Refused(LimitKind::Requests, millis(*wait)),
                    [2, wait] => Shared::Refused(LimitKind::Tokens, millis(*wait)),
                    _ => Shared::Admitted,
                }
            }
            Ok(Err(err)) => self.failed(shared, &err.to_string()),
            Err(_) => self.failed(shared, "timed out"),
        }
    }

    fn degraded(&self, shared: &SharedLimits) -> bool {
        let retry_at = shared.retry_at.lock().unwrap_or_else(|e| e.into_inner());
        retry_at.is_some_and(|at| Instant::now() < at)
    }

    fn failed(&self, shared: &SharedLimits, reason: &str) -> Shared {
        let mut retry_at = shared.retry_at.lock().unwrap_or_else(|e| e.into_inner());
        if retry_at.is_none() {
            tracing::warn!(reason, "rate limits: Redis unreachable, limits are per replica until it answers");
            self.metrics.limits.degraded.set(1);
        }
        *retry_at = Some(Instant::now() + REDIS_RETRY);
        self.metrics.limits.fallbacks.inc();
        Shared::Local
    }

    fn recovered(&self, shared: &SharedLimits) {
        let mut retry_at = shared.retry_at.lock().unwrap_or_else(|e| e.into_inner());
        if retry_at.take().is_some() {
            tracing::info!("rate limits: Redis answers again, limits are shared across replicas");
            self.metrics.limits.degraded.set(0);
        }
    }

    fn correct(&self, charge: &TokenCharge, delta: i64) {
        if !charge.shared {
            if let Some(cell) = &charge.local.tokens {
                cell.adjust(delta);
            }
            return;
        }
        let (Some(shared), Some(tpm)) = (&self.shared, charge.key.limits.tokens_per_minute) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let script = shared.correct.clone();
        let key = shared.keys(&charge.key.name).1;
        let mut conn = shared.conn.clone();
        let timeout = shared.timeout;
        runtime.spawn(async move {
            let mut invocation = script.prepare_invoke();
            invocation.key(key).arg(per_ms(tpm)).arg(delta);
            // Best effort: a lost correction leaves the estimate standing.
            let _ = tokio::time::timeout(timeout, invocation.invoke_async::<i64>(&mut conn)).await;
        });
    }
}

/// What an admitted request holds: its slot among the key's requests in flight, and what it
/// took from the key's request rate (so a refused request can give it back).
#[derive(Debug)]
pub struct Admission {
    pub permit: Option<OwnedSemaphorePermit>,
    rate: Option<RateTaken>,
}

#[derive(Debug)]
struct RateTaken {
    local: Arc<LocalState>,
    /// Taken in Redis too.
    shared: bool,
    rpm: NonZeroU32,
}

/// Milliseconds between two units of a per-minute rate.
fn per_ms(rate: NonZeroU32) -> f64 {
    60_000.0 / f64::from(rate.get())
}

fn millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Tokens taken from a key before the call. Dropped when the request is over: the difference
/// between what the upstream reported (prompt plus completion, over every call the request
/// made) and the estimate is then given back or taken. Without any `usage`, the estimate stands.
#[derive(Debug)]
pub struct TokenCharge {
    limiter: Arc<Limiter>,
    key: Arc<KeyPolicy>,
    local: Arc<LocalState>,
    shared: bool,
    estimate: u64,
    used: AtomicU64,
    seen: AtomicBool,
}

impl crate::openai::UsageObserver for TokenCharge {
    fn record(&self, usage: &Usage) {
        self.used.fetch_add(usage.prompt_tokens + usage.completion_tokens, Ordering::Relaxed);
        self.seen.store(true, Ordering::Relaxed);
    }
}

impl Drop for TokenCharge {
    fn drop(&mut self) {
        let count = |kind, n| {
            let label = KeyKindLabel { key: self.key.name.clone(), kind };
            self.limiter.metrics.limits.tokens.get_or_create(&label).inc_by(n);
        };
        count("estimated", self.estimate);
        if !self.seen.load(Ordering::Relaxed) {
            return;
        }
        count("used", self.used.load(Ordering::Relaxed));
        let used = i64::try_from(self.used.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        let delta = used.saturating_sub(i64::try_from(self.estimate).unwrap_or(i64::MAX));
        if delta != 0 {
            self.limiter.correct(self, delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyConfig;
    use crate::openai::UsageObserver;

    fn key(limits: KeyLimits) -> Arc<KeyPolicy> {
        let config = KeyConfig {
            name: "team-a".into(),
            sha256: super::super::hash_key(b"k"),
            models: Vec::new(),
            requests_per_minute: limits.requests_per_minute,
            burst: limits.burst,
            tokens_per_minute: limits.tokens_per_minute,
            max_concurrent: limits.max_concurrent,
        };
        Arc::new(KeyPolicy::from_config(&config).unwrap())
    }

    fn n(v: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(v)
    }

    fn local() -> Arc<Limiter> {
        Arc::new(Limiter::new(None, Arc::new(Metrics::new())))
    }

    fn refused(result: Result<impl std::fmt::Debug, GatewayError>) -> (LimitKind, Duration) {
        match result {
            Err(GatewayError::RateLimited { limit, retry_after, .. }) => (limit, retry_after),
            other => panic!("expected a 429, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_take_the_burst_then_the_rate() {
        let limiter = local();
        let key = key(KeyLimits { requests_per_minute: n(60), burst: n(3), ..KeyLimits::default() });
        for _ in 0..3 {
            limiter.admit(&key).await.unwrap();
        }
        let (kind, wait) = refused(limiter.admit(&key).await);
        assert_eq!(kind, LimitKind::Requests);
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1), "{wait:?}");
        tokio::time::advance(Duration::from_millis(990)).await;
        assert!(limiter.admit(&key).await.is_err(), "one request frees up after a full second");
        tokio::time::advance(Duration::from_millis(10)).await;
        limiter.admit(&key).await.unwrap();
        assert!(limiter.admit(&key).await.is_err());
        // Idle for a minute: the burst is back, no more.
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..3 {
            limiter.admit(&key).await.unwrap();
        }
        assert!(limiter.admit(&key).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refunded_request_frees_its_place_in_the_rate() {
        let limiter = local();
        let key = key(KeyLimits { requests_per_minute: n(60), burst: n(2), ..KeyLimits::default() });
        let first = limiter.admit(&key).await.unwrap();
        limiter.admit(&key).await.unwrap();
        assert!(limiter.admit(&key).await.is_err());
        limiter.refund(&key, &first).await;
        limiter.admit(&key).await.unwrap();
        assert!(limiter.admit(&key).await.is_err(), "one refund gives back one request");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_estimated_then_corrected_by_usage() {
        let limiter = local();
        let key = key(KeyLimits { tokens_per_minute: n(1000), ..KeyLimits::default() });
        let charge = limiter.charge_tokens(&key, 600).await.unwrap().unwrap();
        let (kind, wait) = refused(limiter.charge_tokens(&key, 600).await);
        assert_eq!(kind, LimitKind::Tokens);
        // 200 tokens over, at 60 ms each.
        assert_eq!(wait, Duration::from_secs(12));
        // The upstream used 100 tokens in all: 500 come back when the request ends.
        charge.record(&Usage { prompt_tokens: 80, completion_tokens: 20, prompt_tokens_details: None });
        drop(charge);
        let second = limiter.charge_tokens(&key, 600).await.unwrap().unwrap();
        // No usage seen: the estimate stands.
        drop(second);
        let (_, wait) = refused(limiter.charge_tokens(&key, 400).await);
        assert_eq!(wait, Duration::from_secs(6));
        // Usage above the estimate takes the difference.
        tokio::time::advance(Duration::from_secs(60)).await;
        let charge = limiter.charge_tokens(&key, 10).await.unwrap().unwrap();
        charge.record(&Usage { prompt_tokens: 10, completion_tokens: 890, prompt_tokens_details: None });
        drop(charge);
        limiter.charge_tokens(&key, 100).await.unwrap();
        assert!(limiter.charge_tokens(&key, 1).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_are_capped_until_their_permit_drops() {
        let limiter = local();
        let key = key(KeyLimits { max_concurrent: n(2), ..KeyLimits::default() });
        let first = limiter.admit(&key).await.unwrap();
        let _second = limiter.admit(&key).await.unwrap();
        let (kind, _) = refused(limiter.admit(&key).await);
        assert_eq!(kind, LimitKind::Concurrency);
        drop(first);
        limiter.admit(&key).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn changed_limits_start_a_new_state() {
        let limiter = local();
        let one = key(KeyLimits { requests_per_minute: n(1), ..KeyLimits::default() });
        limiter.admit(&one).await.unwrap();
        assert!(limiter.admit(&one).await.is_err());
        let raised = key(KeyLimits { requests_per_minute: n(2), ..KeyLimits::default() });
        limiter.admit(&raised).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn keys_without_limits_are_never_refused() {
        let limiter = local();
        let key = key(KeyLimits::default());
        for _ in 0..1000 {
            assert!(limiter.admit(&key).await.unwrap().permit.is_none());
        }
        assert!(limiter.charge_tokens(&key, u64::MAX).await.unwrap().is_none());
    }
}
