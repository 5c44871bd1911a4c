//! Per-caller rate limits: requests per minute, tokens per minute (prompt + completion) and
//! concurrent streams. In-process with governor by default; with Redis, counted in shared
//! one-minute windows by an atomic script so every replica enforces one limit. When Redis does
//! not answer, the gateway falls back to its local limits (or refuses, if configured to fail
//! closed), counts the error, and logs at most once per interval.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::metrics::Metrics;

type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

const WINDOW: Duration = Duration::from_secs(60);
/// How long a Redis call may take before the local limits decide instead.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
/// At most one log line about Redis errors per this interval.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Limits for one caller; 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub rpm: u32,
    pub tpm: u32,
    pub max_streams: u32,
}

/// Where a caller stands against one limit, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy)]
pub struct Standing {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// The outcome of admitting one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Verdict {
    pub requests: Option<Standing>,
    pub tokens: Option<Standing>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisFailure {
    /// Keep serving under the local limits.
    Open,
    /// Refuse with 503 until Redis answers again.
    Closed,
}

/// A fixed one-minute window in Redis: add `ARGV[1]`, start the expiry on first use, return the
/// new count and the milliseconds left.
const WINDOW_SCRIPT: &str = r"
local out = {}
for i, key in ipairs(KEYS) do
  local c = redis.call('INCRBY', key, ARGV[i + 1])
  local ttl = redis.call('PTTL', key)
  if ttl < 0 then redis.call('PEXPIRE', key, ARGV[1]); ttl = tonumber(ARGV[1]) end
  out[2 * i - 1] = c
  out[2 * i] = ttl
end
return out
";

pub struct Limiter {
    defaults: Limits,
    metrics: Arc<Metrics>,
    requests: Mutex<HashMap<String, Arc<Direct>>>,
    /// Local token windows: (window start, tokens used).
    tokens: Mutex<HashMap<String, (Instant, u64)>>,
    streams: Arc<Mutex<HashMap<String, u32>>>,
    redis: Option<(redis::Client, OnceLock<redis::aio::ConnectionManager>)>,
    script: redis::Script,
    failure: RedisFailure,
    last_log_ms: AtomicU64,
    started: Instant,
}

/// Releases a stream slot when dropped.
pub struct StreamSlot {
    key: String,
    streams: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut map = self.streams.lock();
        if let Some(n) = map.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

impl Limiter {
    pub fn new(defaults: Limits, redis: Option<redis::Client>, failure: RedisFailure, metrics: Arc<Metrics>) -> Self {
        Self {
            defaults,
            metrics,
            requests: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            streams: Arc::new(Mutex::new(HashMap::new())),
            redis: redis.map(|c| (c, OnceLock::new())),
            script: redis::Script::new(WINDOW_SCRIPT),
            failure,
            last_log_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    fn limits_for(&self, p: &Principal) -> Limits {
        Limits {
            rpm: p.rpm.unwrap_or(self.defaults.rpm),
            tpm: p.tpm.unwrap_or(self.defaults.tpm),
            max_streams: p.max_streams.unwrap_or(self.defaults.max_streams),
        }
    }

    fn key(p: &Principal) -> String {
        format!("{}:{}", p.tenant, p.sub)
    }

    /// Counts one request and checks the token budget; 429 (with the verdict) when over.
    pub async fn admit(&self, p: &Principal) -> Result<Verdict, (ApiError, Verdict)> {
        let limits = self.limits_for(p);
        let key = Self::key(p);
        let shared = if limits.rpm > 0 || limits.tpm > 0 { self.shared_admit(&key, limits).await } else { None };
        let (requests, tokens) = match shared {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err((e, Verdict::default())),
            None => (self.local_requests(&key, limits.rpm), self.local_tokens(&key, limits.tpm, 0)),
        };
        let verdict = Verdict { requests: requests.map(|r| r.0), tokens: tokens.map(|t| t.0) };
        for (name, over) in [("requests", requests.is_some_and(|r| !r.1)), ("tokens", tokens.is_some_and(|t| !t.1))] {
            if over {
                self.metrics.rejected_concurrency.with_label_values(&[name]).inc();
                let message = format!("rate limit reached for {name} per minute; retry after the reset time");
                return Err((ApiError::RateLimited { message, code: "rate_limit_exceeded" }, verdict));
            }
        }
        Ok(verdict)
    }

    /// Adds a finished request's prompt and completion tokens to the caller's token window:
    /// locally at once, or in Redis from a background task (locally if Redis fails).
    pub fn charge(self: &Arc<Self>, p: &Principal, tokens: u64) {
        let limits = self.limits_for(p);
        if limits.tpm == 0 || tokens == 0 {
            return;
        }
        let key = Self::key(p);
        if self.redis.is_none() {
            self.local_tokens(&key, limits.tpm, tokens);
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let shared = match me.connection() {
                Some(conn) => me.windows(conn, &[(format!("switchyard:tpm:{key}"), tokens)]).await.map(|_| ()),
                None => Err("not connected".into()),
            };
            if let Err(e) = shared {
                me.redis_error("charge", &e);
                me.local_tokens(&key, limits.tpm, tokens);
            }
        });
    }

    /// Takes one of the caller's concurrent stream slots, or says 429.
    pub fn stream_slot(&self, p: &Principal) -> Result<Option<StreamSlot>, ApiError> {
        let max = self.limits_for(p).max_streams;
        if max == 0 {
            return Ok(None);
        }
        let key = Self::key(p);
        let mut map = self.streams.lock();
        let n = map.entry(key.clone()).or_default();
        if *n >= max {
            self.metrics.rejected_concurrency.with_label_values(&["streams"]).inc();
            return Err(ApiError::RateLimited {
                message: format!("at most {max} concurrent streams per key"),
                code: "stream_limit_exceeded",
            });
        }
        *n += 1;
        Ok(Some(StreamSlot { key, streams: self.streams.clone() }))
    }

    /// `(standing, allowed)` from the local governor limiter.
    fn local_requests(&self, key: &str, rpm: u32) -> Option<(Standing, bool)> {
        let per_minute = NonZeroU32::new(rpm)?;
        let limiter = self
            .requests
            .lock()
            .entry(key.to_owned())
            .or_insert_with(|| {
                Arc::new(
                    RateLimiter::direct(Quota::per_minute(per_minute)).with_middleware::<StateInformationMiddleware>(),
                )
            })
            .clone();
        let one_cell = WINDOW / rpm;
        Some(match limiter.check() {
            Ok(snapshot) => {
                let remaining = u64::from(snapshot.remaining_burst_capacity());
                (Standing { limit: rpm.into(), remaining, reset: one_cell * (rpm - remaining as u32) }, true)
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                (Standing { limit: rpm.into(), remaining: 0, reset: wait }, false)
            }
        })
    }

    /// Adds `add` tokens to the local window and returns `(standing, under the limit)`.
    fn local_tokens(&self, key: &str, tpm: u32, add: u64) -> Option<(Standing, bool)> {
        if tpm == 0 {
            return None;
        }
        let mut map = self.tokens.lock();
        let now = Instant::now();
        let entry = map.entry(key.to_owned()).or_insert((now, 0));
        if now.duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        entry.1 += add;
        let used = entry.1;
        let reset = WINDOW.saturating_sub(now.duration_since(entry.0));
        Some((
            Standing { limit: tpm.into(), remaining: u64::from(tpm).saturating_sub(used), reset },
            used < u64::from(tpm),
        ))
    }

    fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        self.redis.as_ref().and_then(|(_, c)| c.get().cloned())
    }

    /// Connects to Redis in the background, retrying while it is unreachable.
    pub fn connect(self: &Arc<Self>) {
        let Some((client, _)) = &self.redis else { return };
        let (client, me) = (client.clone(), self.clone());
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                match redis::aio::ConnectionManager::new(client.clone()).await {
                    Ok(conn) => {
                        if let Some((_, cell)) = &me.redis {
                            let _ = cell.set(conn);
                        }
                        return;
                    }
                    Err(e) => me.redis_error("connect", &e.to_string()),
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        });
    }

    /// With Redis: both windows from the shared counters. `None` without Redis, or when it
    /// failed and we fail open (then the local limits decide).
    async fn shared_admit(
        &self,
        key: &str,
        limits: Limits,
    ) -> Option<Result<(Option<(Standing, bool)>, Option<(Standing, bool)>), ApiError>> {
        self.redis.as_ref()?;
        // Both windows in one round trip: the request counts, the token window is read.
        let mut keys = Vec::with_capacity(2);
        if limits.rpm > 0 {
            keys.push((format!("switchyard:rpm:{key}"), 1));
        }
        if limits.tpm > 0 {
            keys.push((format!("switchyard:tpm:{key}"), 0));
        }
        let result = match self.connection() {
            None => Err("not connected".to_owned()),
            Some(conn) => self.windows(conn, &keys).await.map(|counts| {
                let mut counts = counts.into_iter();
                let requests = (limits.rpm > 0)
                    .then(|| counts.next())
                    .flatten()
                    .map(|(count, reset)| (standing(limits.rpm, count, reset), count <= u64::from(limits.rpm)));
                let tokens = (limits.tpm > 0)
                    .then(|| counts.next())
                    .flatten()
                    .map(|(used, reset)| (standing(limits.tpm, used, reset), used < u64::from(limits.tpm)));
                (requests, tokens)
            }),
        };
        match result {
            Ok(v) => Some(Ok(v)),
            Err(e) => {
                self.redis_error("limit", &e);
                match self.failure {
                    RedisFailure::Open => None,
                    RedisFailure::Closed => Some(Err(ApiError::Unavailable {
                        message: "rate limits cannot be checked right now; retry shortly".into(),
                    })),
                }
            }
        }
    }

    /// Adds `n` to each shared window in one script call; `(count, time to reset)` of each.
    async fn windows(
        &self,
        mut conn: redis::aio::ConnectionManager,
        keys: &[(String, u64)],
    ) -> Result<Vec<(u64, Duration)>, String> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(WINDOW.as_millis() as u64);
        for (key, n) in keys {
            invocation.key(key).arg(*n);
        }
        let call = invocation.invoke_async::<Vec<i64>>(&mut conn);
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Ok(Ok(flat)) if flat.len() == 2 * keys.len() => Ok(flat
                .chunks_exact(2)
                .map(|c| (c[0].max(0) as u64, Duration::from_millis(c[1].max(0) as u64)))
                .collect()),
            Ok(Ok(flat)) => Err(format!("the window script returned {} values for {} keys", flat.len(), keys.len())),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    fn redis_error(&self, op: &str, message: &str) {
        self.metrics.redis_errors.with_label_values(&[op]).inc();
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= LOG_EVERY.as_millis() as u64)
            && self.last_log_ms.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            let fallback = match self.failure {
                RedisFailure::Open => "serving under local limits",
                RedisFailure::Closed => "refusing requests",
            };
            tracing::warn!(error = message, op, "Redis unavailable for rate limits; {fallback} (logged once per 10 s)");
        }
    }
}

fn standing(limit: u32, count: u64, reset: Duration) -> Standing {
    Standing { limit: limit.into(), remaining: u64::from(limit).saturating_sub(count), reset }
}

/// Adds the OpenAI-style `x-ratelimit-*` headers for whatever limits apply.
pub fn add_headers(headers: &mut actix_web::http::header::HeaderMap, verdict: &Verdict) {
    use actix_web::http::header::{HeaderName, HeaderValue};
    for (kind, standing) in [("requests", verdict.requests), ("tokens", verdict.tokens)] {
        let Some(s) = standing else { continue };
        for (what, value) in [
            ("limit", s.limit.to_string()),
            ("remaining", s.remaining.to_string()),
            ("reset", format!("{:.3}s", s.reset.as_secs_f64())),
        ] {
            if let (Ok(name), Ok(value)) =
                (HeaderName::try_from(format!("x-ratelimit-{what}-{kind}")), HeaderValue::from_str(&value))
            {
                headers.insert(name, value);
            }
        }
    }
}
