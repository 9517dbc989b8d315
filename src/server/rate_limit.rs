//! Per-identity rate limiting, so that one noisy tenant cannot starve the HSM: a token bucket
//! per caller identity (and cluster). Over the limit, requests get ResourceExhausted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A per-identity limit: `rate` requests per second on average, bursts of `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Sustained requests per second.
    pub rate: f64,
    /// Largest burst.
    pub burst: f64,
}

/// Token buckets by identity.
pub struct RateLimiter {
    limit: Limit,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

const MAX_KEYS: usize = 100_000;

impl RateLimiter {
    /// A limiter with `limit` per identity.
    pub fn new(limit: Limit) -> Self {
        RateLimiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The limit.
    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Takes one token for `key` at `now`; false when the bucket is empty.
    pub fn allow(&self, key: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            // Forget buckets that have refilled completely; they carry no state.
            let full = self.limit.burst;
            let rate = self.limit.rate;
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < full
            });
            if buckets.len() >= MAX_KEYS {
                return false;
            }
        }
        let (tokens, at) = buckets
            .entry(key.to_owned())
            .or_insert((self.limit.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.limit.rate)
            .min(self.limit.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_refills_per_identity() {
        let l = RateLimiter::new(Limit {
            rate: 2.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow("a", t0)));
        assert!(!l.allow("a", t0), "burst exhausted");
        assert!(l.allow("b", t0), "another identity is not affected");
        assert!(!l.allow("a", t0 + Duration::from_millis(400)));
        assert!(
            l.allow("a", t0 + Duration::from_millis(600)),
            "refilled at 2/s"
        );
    }
}
