//! The policy file (TOML) and its checked form. Loading validates everything and reports the
//! file, line and reason; a rule may only tighten the defaults.

use std::time::Duration;

use serde::Deserialize;
use sha2::Digest;
use toml::Spanned;

use crate::glob::Glob;
use crate::template::{SanKind, Template};
use crate::{SpiffeId, parse_duration};

/// Authenticator names a rule may require.
pub const AUTHENTICATORS: [&str; 3] = ["kube-jwt", "client-cert", "jwt"];
/// Key types a policy may allow.
pub const KEY_TYPES: [&str; 5] = [
    "ecdsa-p256",
    "ecdsa-p384",
    "rsa-2048",
    "rsa-3072",
    "rsa-4096",
];

/// What to do with SANs the CSR asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrSans {
    /// Drop them (Istio's behaviour).
    Ignore,
    /// Refuse a CSR asking for a SAN the matching rule does not produce.
    Deny,
}

/// Limits that apply to every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// Lifetime when the request asks for none.
    pub lifetime: Duration,
    /// Longest lifetime a request may ask for.
    pub max_lifetime: Duration,
    /// Shortest lifetime a request may ask for.
    pub min_lifetime: Duration,
    /// Allowed key types.
    pub key_types: Vec<String>,
    /// CSR SAN handling.
    pub csr_sans: CsrSans,
}

/// Who a rule is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// Authenticators (empty: any).
    pub authenticators: Vec<String>,
    /// Cluster globs.
    pub clusters: Vec<Glob>,
    /// Namespace globs.
    pub namespaces: Vec<Glob>,
    /// Service-account globs.
    pub service_accounts: Vec<Glob>,
}

/// A deny rule: any match refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenyRule {
    /// Name, reported in the decision.
    pub name: String,
    /// Who it refuses.
    pub selector: Selector,
    /// Why, for the caller.
    pub reason: String,
}

/// An allow rule: the first match decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Name, reported in the decision.
    pub name: String,
    /// Who it is for.
    pub selector: Selector,
    /// URI SAN templates.
    pub uri_sans: Vec<Template>,
    /// DNS SAN templates (issued only when the CSR asks for exactly that name).
    pub dns_sans: Vec<Template>,
    /// Longest lifetime (never above the default's).
    pub max_lifetime: Duration,
    /// Key types (a subset of the defaults').
    pub key_types: Vec<String>,
}

/// A checked policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Trust domain.
    pub trust_domain: String,
    /// Defaults.
    pub defaults: Defaults,
    /// Deny rules, checked first.
    pub deny: Vec<DenyRule>,
    /// Allow rules, in order.
    pub rules: Vec<Rule>,
    /// SHA-256 of the source text (the policy version in audit records).
    pub version_hash: String,
}

/// Why a policy file was refused: file, line and reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct PolicyError {
    /// The file name given to [`Policy::parse`].
    pub file: String,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: u32,
    trust_domain: Option<Spanned<String>>,
    #[serde(default)]
    defaults: Option<Spanned<RawDefaults>>,
    #[serde(default)]
    deny: Vec<Spanned<RawDeny>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    lifetime: Option<String>,
    max_lifetime: Option<String>,
    min_lifetime: Option<String>,
    key_types: Option<Vec<String>>,
    csr_sans: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeny {
    name: String,
    #[serde(default)]
    authenticators: Vec<String>,
    #[serde(default)]
    clusters: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    authenticators: Vec<String>,
    #[serde(default)]
    clusters: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    service_accounts: Vec<String>,
    uri_sans: Vec<String>,
    #[serde(default)]
    dns_sans: Vec<String>,
    max_lifetime: Option<String>,
    key_types: Option<Vec<String>>,
}

/// Istio's behaviour as a policy: the caller's identity, 24h by default, at most 90 days.
pub const DEFAULT_POLICY: &str = r#"version = 1
trust_domain = "cluster.local"

[defaults]
lifetime = "24h"
max_lifetime = "90d"
min_lifetime = "0s"
key_types = ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
csr_sans = "ignore"

[[rule]]
name = "istio-default"
authenticators = ["kube-jwt", "client-cert", "jwt"]
clusters = ["*"]
namespaces = ["*"]
service_accounts = ["*"]
uri_sans = ["spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"]
"#;

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn selector(
    authenticators: Vec<String>,
    clusters: Vec<String>,
    namespaces: Vec<String>,
    service_accounts: Vec<String>,
) -> Result<Selector, String> {
    for a in &authenticators {
        if !AUTHENTICATORS.contains(&a.as_str()) {
            return Err(format!(
                "unknown authenticator {a:?} (known: {})",
                AUTHENTICATORS.join(", ")
            ));
        }
    }
    let globs = |key: &str, v: Vec<String>| -> Result<Vec<Glob>, String> {
        let v = if v.is_empty() {
            vec!["*".to_owned()]
        } else {
            v
        };
        v.iter()
            .map(|g| Glob::new(g).map_err(|e| format!("{key}: {e}")))
            .collect()
    };
    Ok(Selector {
        authenticators,
        clusters: globs("clusters", clusters)?,
        namespaces: globs("namespaces", namespaces)?,
        service_accounts: globs("service_accounts", service_accounts)?,
    })
}

fn key_types(key: &str, v: Vec<String>) -> Result<Vec<String>, String> {
    for k in &v {
        if !KEY_TYPES.contains(&k.as_str()) {
            return Err(format!(
                "{key}: unknown key type {k:?} (known: {})",
                KEY_TYPES.join(", ")
            ));
        }
    }
    if v.is_empty() {
        return Err(format!("{key}: allow at least one key type"));
    }
    Ok(v)
}

fn duration(key: &str, v: &str) -> Result<Duration, String> {
    parse_duration(v).map_err(|e| format!("{key}: {e}"))
}

impl Policy {
    /// The built-in policy, reproducing istiod, for `trust_domain` and the given lifetimes.
    pub fn istio_default(
        trust_domain: &str,
        lifetime: Duration,
        max_lifetime: Duration,
    ) -> Result<Policy, PolicyError> {
        let mut p = Policy::parse("<built-in policy>", DEFAULT_POLICY)?;
        SpiffeId::parse(&format!("spiffe://{trust_domain}")).map_err(|e| PolicyError {
            file: "<built-in policy>".into(),
            line: 0,
            reason: format!("trust domain: {e}"),
        })?;
        p.trust_domain = trust_domain.to_owned();
        p.defaults.lifetime = lifetime;
        p.defaults.max_lifetime = max_lifetime;
        p.rules[0].max_lifetime = max_lifetime;
        Ok(p)
    }

    /// Parses and checks a policy file's text. `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Policy, PolicyError> {
        let err = |line: usize, reason: String| PolicyError {
            file: file.to_owned(),
            line,
            reason,
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            err(line, e.message().to_owned())
        })?;
        if raw.version != 1 {
            return Err(err(
                1,
                format!("version {} is not supported (expected 1)", raw.version),
            ));
        }
        let trust_domain = match raw.trust_domain {
            Some(td) => {
                let line = line_of(text, td.span().start);
                let td = td.into_inner();
                SpiffeId::parse(&format!("spiffe://{td}"))
                    .map_err(|e| err(line, format!("trust_domain: {e}")))?;
                td
            }
            None => "cluster.local".to_owned(),
        };
        let (d_line, d) = match raw.defaults {
            Some(d) => (line_of(text, d.span().start), d.into_inner()),
            None => (0, RawDefaults::default()),
        };
        let defaults = Defaults {
            lifetime: duration("defaults.lifetime", d.lifetime.as_deref().unwrap_or("24h"))
                .map_err(|r| err(d_line, r))?,
            max_lifetime: duration(
                "defaults.max_lifetime",
                d.max_lifetime.as_deref().unwrap_or("90d"),
            )
            .map_err(|r| err(d_line, r))?,
            min_lifetime: duration(
                "defaults.min_lifetime",
                d.min_lifetime.as_deref().unwrap_or("0s"),
            )
            .map_err(|r| err(d_line, r))?,
            key_types: key_types(
                "defaults.key_types",
                d.key_types
                    .unwrap_or_else(|| KEY_TYPES.map(String::from).to_vec()),
            )
            .map_err(|r| err(d_line, r))?,
            csr_sans: match d.csr_sans.as_deref().unwrap_or("ignore") {
                "ignore" => CsrSans::Ignore,
                "deny" => CsrSans::Deny,
                other => {
                    return Err(err(
                        d_line,
                        format!("defaults.csr_sans: {other:?} is neither \"ignore\" nor \"deny\""),
                    ));
                }
            },
        };
        if defaults.lifetime.is_zero()
            || defaults.lifetime > defaults.max_lifetime
            || defaults.min_lifetime > defaults.lifetime
        {
            return Err(err(
                d_line,
                "defaults: need 0 < min_lifetime <= lifetime <= max_lifetime".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut deny = Vec::new();
        for d in raw.deny {
            let line = line_of(text, d.span().start);
            let d = d.into_inner();
            let e = |r: String| err(line, format!("deny {:?}: {r}", d.name));
            if d.name.is_empty() || !names.insert(d.name.clone()) {
                return Err(err(
                    line,
                    format!("deny rule name {:?} is empty or used twice", d.name),
                ));
            }
            if d.reason.trim().is_empty() {
                return Err(e("a deny rule needs a reason".into()));
            }
            deny.push(DenyRule {
                selector: selector(
                    d.authenticators,
                    d.clusters,
                    d.namespaces,
                    d.service_accounts,
                )
                .map_err(e)?,
                name: d.name,
                reason: d.reason,
            });
        }
        let mut rules = Vec::new();
        for r in raw.rule {
            let line = line_of(text, r.span().start);
            let r = r.into_inner();
            let e = |reason: String| err(line, format!("rule {:?}: {reason}", r.name));
            if r.name.is_empty() || !names.insert(r.name.clone()) {
                return Err(err(
                    line,
                    format!("rule name {:?} is empty or used twice", r.name),
                ));
            }
            if r.authenticators.is_empty() {
                return Err(e("authenticators: name at least one".into()));
            }
            if r.uri_sans.is_empty() {
                return Err(e(
                    "uri_sans: a workload certificate needs a URI SAN template".into(),
                ));
            }
            let uri_sans = r
                .uri_sans
                .iter()
                .map(|t| Template::parse(t, SanKind::Uri))
                .collect::<Result<Vec<_>, _>>()
                .map_err(e)?;
            let dns_sans = r
                .dns_sans
                .iter()
                .map(|t| Template::parse(t, SanKind::Dns))
                .collect::<Result<Vec<_>, _>>()
                .map_err(e)?;
            let max_lifetime = match &r.max_lifetime {
                Some(m) => duration("max_lifetime", m).map_err(e)?,
                None => defaults.max_lifetime,
            };
            if max_lifetime > defaults.max_lifetime {
                return Err(e(format!(
                    "max_lifetime {} loosens defaults.max_lifetime {}; a rule may only tighten the defaults",
                    crate::format_duration(max_lifetime),
                    crate::format_duration(defaults.max_lifetime)
                )));
            }
            if max_lifetime < defaults.min_lifetime || max_lifetime.is_zero() {
                return Err(e("max_lifetime is below defaults.min_lifetime".into()));
            }
            let kt = match r.key_types.clone() {
                Some(k) => key_types("key_types", k).map_err(e)?,
                None => defaults.key_types.clone(),
            };
            if let Some(k) = kt.iter().find(|k| !defaults.key_types.contains(k)) {
                return Err(e(format!(
                    "key_types: {k:?} is not in defaults.key_types; a rule may only tighten the defaults"
                )));
            }
            rules.push(Rule {
                selector: selector(
                    r.authenticators.clone(),
                    r.clusters.clone(),
                    r.namespaces.clone(),
                    r.service_accounts.clone(),
                )
                .map_err(e)?,
                name: r.name,
                uri_sans,
                dns_sans,
                max_lifetime,
                key_types: kt,
            });
        }
        Ok(Policy {
            trust_domain,
            defaults,
            deny,
            rules,
            version_hash: hex::encode(sha2::Sha256::digest(text.as_bytes())),
        })
    }
}
