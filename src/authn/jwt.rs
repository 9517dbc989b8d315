//! JWT/OIDC authentication for workloads outside Kubernetes (Istio's `JWT_RULE`): a token signed
//! by a key of a configured issuer's JWKS, for one of the configured audiences, whose `sub` is
//! `system:serviceaccount:<ns>:<sa>`. Accepted algorithms: RS256 and ES256 (never `none`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde::Deserialize;

use super::{AuthKind, Caller, Outcome, RequestCredentials};

/// One trusted issuer.
#[derive(Debug, Clone)]
pub struct JwtRule {
    /// `iss` of the tokens.
    pub issuer: String,
    /// Accepted `aud` values (any one suffices).
    pub audiences: Vec<String>,
    /// The issuer's JWKS (JSON Web Key Set), re-read when it changes.
    pub jwks_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Debug, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    #[serde(default)]
    aud: Option<Audience>,
    exp: u64,
    #[serde(default)]
    nbf: Option<u64>,
}

/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY: u64 = 60;

struct Cached {
    checked: Instant,
    modified: Option<SystemTime>,
    keys: Vec<Jwk>,
}

/// The JWT authenticator.
pub struct JwtAuthenticator {
    rules: Vec<JwtRule>,
    trust_domain: String,
    jwks: Mutex<HashMap<PathBuf, Cached>>,
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

impl JwtAuthenticator {
    /// Builds the authenticator; every JWKS file must load now.
    pub fn new(rules: Vec<JwtRule>, trust_domain: &str) -> anyhow::Result<Self> {
        let a = JwtAuthenticator {
            rules,
            trust_domain: trust_domain.to_owned(),
            jwks: Mutex::new(HashMap::new()),
        };
        for rule in &a.rules {
            a.keys(&rule.jwks_file)
                .map_err(|e| anyhow::anyhow!("JWKS of issuer {}: {e}", rule.issuer))?;
        }
        Ok(a)
    }

    /// The issuer's keys, re-read when the file changed (checked at most every 5 s).
    fn keys(&self, path: &PathBuf) -> Result<Vec<Jwk>, String> {
        let mut cache = self.jwks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.get(path)
            && c.checked.elapsed() < Duration::from_secs(5)
        {
            return Ok(c.keys.clone());
        }
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if let Some(c) = cache.get_mut(path)
            && c.modified == modified
        {
            c.checked = Instant::now();
            return Ok(c.keys.clone());
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let jwks: Jwks = serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a JWKS: {e}", path.display()))?;
        cache.insert(
            path.clone(),
            Cached {
                checked: Instant::now(),
                modified,
                keys: jwks.keys.clone(),
            },
        );
        Ok(jwks.keys)
    }

    pub(super) fn authenticate(&self, creds: &RequestCredentials) -> Outcome {
        let Some(token) = creds.bearer.as_ref() else {
            return Outcome::NotApplicable;
        };
        let parts: Vec<&str> = token.split('.').collect();
        let [h, p, s] = parts.as_slice() else {
            return Outcome::NotApplicable;
        };
        let Some(claims) = b64(p).and_then(|b| serde_json::from_slice::<Claims>(&b).ok()) else {
            return Outcome::NotApplicable;
        };
        // Tokens of other issuers are for the other authenticators.
        let Some(rule) = self.rules.iter().find(|r| r.issuer == claims.iss) else {
            return Outcome::NotApplicable;
        };
        if !creds.tls {
            return Outcome::Failure("a bearer token is never accepted over plaintext".into());
        }
        let Some(header) = b64(h).and_then(|b| serde_json::from_slice::<Header>(&b).ok()) else {
            return Outcome::Failure("JWT header does not parse".into());
        };
        let Some(sig) = b64(s) else {
            return Outcome::Failure("JWT signature is not base64url".into());
        };
        let keys = match self.keys(&rule.jwks_file) {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(issuer = %rule.issuer, error = %e, "JWKS unavailable");
                return Outcome::Unavailable(format!(
                    "the keys of issuer {} are unavailable",
                    rule.issuer
                ));
            }
        };
        let message = format!("{h}.{p}");
        let candidates = keys
            .iter()
            .filter(|k| header.kid.is_none() || k.kid == header.kid);
        let verified = candidates
            .into_iter()
            .any(|k| verify(&header.alg, k, message.as_bytes(), &sig));
        if !verified {
            return Outcome::Failure(format!(
                "JWT signature does not verify with the keys of issuer {} (alg {})",
                rule.issuer, header.alg
            ));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if claims.exp + LEEWAY < now {
            return Outcome::Failure("JWT has expired".into());
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + LEEWAY) {
            return Outcome::Failure("JWT is not valid yet".into());
        }
        let auds = match claims.aud {
            Some(Audience::One(a)) => vec![a],
            Some(Audience::Many(a)) => a,
            None => vec![],
        };
        if !auds.iter().any(|a| rule.audiences.contains(a)) {
            return Outcome::Failure(format!(
                "JWT audience {auds:?} is not one of {:?}",
                rule.audiences
            ));
        }
        let sub: Vec<&str> = claims.sub.split(':').collect();
        let (ns, sa) = match sub.as_slice() {
            ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => (*ns, *sa),
            _ => {
                return Outcome::Failure(format!(
                    "JWT subject {:?} is not system:serviceaccount:<ns>:<sa>",
                    claims.sub
                ));
            }
        };
        Outcome::Success(Caller {
            kind: AuthKind::Jwt,
            identities: vec![format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain)],
            cluster: None,
            namespace: Some(ns.to_owned()),
            service_account: Some(sa.to_owned()),
            pod_name: None,
            pod_uid: None,
            token_sha256: creds.token_sha256(),
        })
    }
}

fn verify(alg: &str, key: &Jwk, message: &[u8], sig: &[u8]) -> bool {
    use ring::signature as rs;
    match (alg, key.kty.as_str()) {
        ("RS256", "RSA") => {
            let (Some(n), Some(e)) = (
                key.n.as_deref().and_then(b64),
                key.e.as_deref().and_then(b64),
            ) else {
                return false;
            };
            rs::RsaPublicKeyComponents { n: &n, e: &e }
                .verify(&rs::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok()
        }
        ("ES256", "EC") if key.crv.as_deref() == Some("P-256") => {
            let (Some(x), Some(y)) = (
                key.x.as_deref().and_then(b64),
                key.y.as_deref().and_then(b64),
            ) else {
                return false;
            };
            let mut point = vec![0x04];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            rs::UnparsedPublicKey::new(&rs::ECDSA_P256_SHA256_FIXED, &point)
                .verify(message, sig)
                .is_ok()
        }
        _ => false,
    }
}
