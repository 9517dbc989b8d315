//! Kubernetes service-account JWTs, checked with a TokenReview (`authentication.k8s.io/v1`)
//! against the API server of the caller's cluster, as istiod does.
//!
//! Accepted only when the review says `authenticated=true`, without error, the groups contain
//! `system:serviceaccounts` and the username is `system:serviceaccount:<ns>:<sa>`. Positive
//! results are cached by SHA-256 of (cluster, token) for a short time, never past the token's
//! `exp`; failures are not cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::Digest;

use super::{AuthKind, Caller, Outcome, RequestCredentials};

/// How the Kubernetes JWT authenticator is set up.
pub struct KubeJwtSettings {
    /// Accepted audiences (`TOKEN_AUDIENCES`, default `istio-ca`).
    pub audiences: Vec<String>,
    /// The id of the local cluster (`CLUSTER_ID`, default `Kubernetes`).
    pub local_cluster: String,
    /// The local cluster's client, when there is one.
    pub local: Option<kube::Client>,
    /// Remote clusters by id.
    pub remote: HashMap<String, kube::Client>,
    /// Trust domain of the identities.
    pub trust_domain: String,
    /// Longest time a positive review is reused.
    pub cache_ttl: Duration,
}

/// The Kubernetes JWT authenticator.
pub struct KubeJwtAuthenticator {
    settings: KubeJwtSettings,
    cache: Mutex<HashMap<[u8; 32], (Caller, Instant)>>,
}

const CACHE_MAX: usize = 100_000;
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

impl KubeJwtAuthenticator {
    /// Builds the authenticator.
    pub fn new(settings: KubeJwtSettings) -> Self {
        KubeJwtAuthenticator {
            settings,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn client_for(&self, cluster: &str) -> Result<&kube::Client, String> {
        if cluster.is_empty() || cluster == self.settings.local_cluster {
            return self.settings.local.as_ref().ok_or_else(|| {
                "this CA has no Kubernetes API access for the local cluster".to_string()
            });
        }
        self.settings.remote.get(cluster).ok_or_else(|| {
            let mut known: Vec<&str> = self.settings.remote.keys().map(String::as_str).collect();
            if self.settings.local.is_some() {
                known.push(&self.settings.local_cluster);
            }
            known.sort_unstable();
            format!(
                "client claims to be in cluster {cluster:?}, but this CA only knows clusters {known:?}"
            )
        })
    }

    pub(super) async fn authenticate(&self, creds: &RequestCredentials) -> Outcome {
        let Some(token) = creds.bearer.as_ref() else {
            return Outcome::NotApplicable;
        };
        if !creds.tls {
            return Outcome::Failure("a bearer token is never accepted over plaintext".into());
        }
        let cluster = match creds.cluster_ids.as_slice() {
            [] => String::new(),
            [one] => one.clone(),
            many => {
                return Outcome::Failure(format!(
                    "the clusterid header was given {} times; give it once",
                    many.len()
                ));
            }
        };
        let client = match self.client_for(&cluster) {
            Ok(c) => c.clone(),
            Err(e) => return Outcome::Failure(e),
        };
        let key: [u8; 32] = {
            let mut h = sha2::Sha256::new();
            h.update(cluster.as_bytes());
            h.update([0]);
            h.update(token.as_bytes());
            h.finalize().into()
        };
        if let Some(caller) = self.cached(&key) {
            return Outcome::Success(caller);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(self.settings.audiences.clone()),
            },
            ..Default::default()
        };
        let result = Api::<TokenReview>::all(client)
            .create(&PostParams::default(), &review)
            .await;
        let status = match result {
            Ok(r) => r.status.unwrap_or_default(),
            Err(kube::Error::Api(e)) => {
                tracing::warn!(cluster = %cluster, code = e.code, reason = %e.reason, "TokenReview refused by the API server");
                return Outcome::Unavailable(format!(
                    "the token could not be reviewed in cluster {cluster:?}"
                ));
            }
            Err(e) => {
                tracing::warn!(cluster = %cluster, error = ?e, "TokenReview failed");
                return Outcome::Unavailable(format!(
                    "the Kubernetes API of cluster {cluster:?} is unreachable"
                ));
            }
        };
        if let Some(err) = status.error.filter(|e| !e.is_empty()) {
            return Outcome::Failure(format!("token rejected: {err}"));
        }
        if status.authenticated != Some(true) {
            return Outcome::Failure("token rejected: not authenticated".into());
        }
        let user = status.user.unwrap_or_default();
        if !user
            .groups
            .unwrap_or_default()
            .iter()
            .any(|g| g == "system:serviceaccounts")
        {
            return Outcome::Failure("token is not a service-account token".into());
        }
        let username = user.username.unwrap_or_default();
        let parts: Vec<&str> = username.split(':').collect();
        let (ns, sa) = match parts.as_slice() {
            ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => (*ns, *sa),
            _ => {
                return Outcome::Failure(format!(
                    "username {username:?} is not system:serviceaccount:<ns>:<sa>"
                ));
            }
        };
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let identity = format!("spiffe://{}/ns/{ns}/sa/{sa}", self.settings.trust_domain);
        let caller = Caller {
            kind: AuthKind::KubeJwt,
            identities: vec![identity],
            cluster: Some(if cluster.is_empty() {
                self.settings.local_cluster.clone()
            } else {
                cluster
            }),
            namespace: Some(ns.to_owned()),
            service_account: Some(sa.to_owned()),
            pod_name: first(POD_NAME),
            pod_uid: first(POD_UID),
            token_sha256: creds.token_sha256(),
        };
        let ttl = cache_ttl(token, self.settings.cache_ttl);
        if !ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_MAX {
                let now = Instant::now();
                cache.retain(|_, (_, exp)| *exp > now);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(key, (caller.clone(), Instant::now() + ttl));
        }
        Outcome::Success(caller)
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Caller> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(key) {
            Some((caller, exp)) if *exp > Instant::now() => Some(caller.clone()),
            Some(_) => {
                cache.remove(key);
                None
            }
            None => None,
        }
    }
}

/// How long a positive review may be reused: at most `max`, never past the JWT's `exp`
/// (read without verification: the API server verified it), and not at all without one.
fn cache_ttl(token: &str, max: Duration) -> Duration {
    let Some(payload) = token.split('.').nth(1) else {
        return Duration::ZERO;
    };
    let Ok(bytes) =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))
    else {
        return Duration::ZERO;
    };
    let Some(exp) = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("exp").and_then(serde_json::Value::as_u64))
    else {
        return Duration::ZERO;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    Duration::from_secs(exp.saturating_sub(now)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(exp: u64) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            b64(r#"{"alg":"RS256"}"#),
            b64(&format!(r#"{{"exp":{exp}}}"#))
        )
    }

    #[test]
    fn cache_never_outlives_the_token() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let max = Duration::from_secs(300);
        assert_eq!(cache_ttl(&jwt(now + 3600), max), max);
        let short = cache_ttl(&jwt(now + 30), max);
        assert!(
            short <= Duration::from_secs(30) && short >= Duration::from_secs(28),
            "{short:?}"
        );
        assert_eq!(cache_ttl(&jwt(now - 10), max), Duration::ZERO);
        assert_eq!(cache_ttl("not-a-jwt", max), Duration::ZERO);
    }
}
