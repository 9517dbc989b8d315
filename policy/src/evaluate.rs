//! `evaluate(&Policy, &Request) -> Decision`: pure, total, explainable.

use std::time::{Duration, SystemTime};

use crate::model::{CsrSans, Policy, Selector};
use crate::template::Vars;

/// Everything the decision depends on. The clock is passed in.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Authenticator that accepted the caller (`kube-jwt`, `client-cert`, `jwt`).
    pub authenticator: &'a str,
    /// The caller's authenticated identities.
    pub identities: &'a [String],
    /// Cluster id.
    pub cluster: Option<&'a str>,
    /// Namespace (of the impersonated identity when impersonating).
    pub namespace: Option<&'a str>,
    /// Service account (of the impersonated identity when impersonating).
    pub service_account: Option<&'a str>,
    /// Pod name.
    pub pod: Option<&'a str>,
    /// Key type of the CSR (`ecdsa-p256`, `rsa-2048`, ...).
    pub key_type: &'a str,
    /// URI SANs the CSR asks for.
    pub csr_uri_sans: &'a [String],
    /// DNS SANs the CSR asks for.
    pub csr_dns_sans: &'a [String],
    /// The CSR subject had a CommonName.
    pub csr_has_common_name: bool,
    /// Requested lifetime (`None`: the default).
    pub lifetime: Option<Duration>,
    /// The identity asked for by a trusted node agent, already authorised.
    pub impersonated: Option<&'a str>,
    /// Now.
    pub now: SystemTime,
}

/// An approval: exactly what the certificate will say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The rule that matched.
    pub rule: String,
    /// URI SANs.
    pub uri_sans: Vec<String>,
    /// DNS SANs.
    pub dns_sans: Vec<String>,
    /// The subject CommonName, when the CSR had one (Istio's dual-use CN: the first identity).
    pub common_name: Option<String>,
    /// notBefore (now; the issuer applies its clock-skew allowance).
    pub not_before: SystemTime,
    /// notAfter (the issuer may cut it to its own notAfter).
    pub not_after: SystemTime,
    /// Key usages, by name.
    pub key_usages: Vec<&'static str>,
}

/// What kind of refusal, which fixes the status the caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyKind {
    /// The request itself is out of bounds (lifetime, key type): InvalidArgument.
    InvalidRequest,
    /// A rule refused it: PermissionDenied.
    Refused,
}

/// A refusal: the rule or check that refused, and a reason a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The kind.
    pub kind: DenyKind,
    /// The rule or check that refused (`defaults.max_lifetime`, a deny rule's name, ...).
    pub rule: String,
    /// Why.
    pub reason: String,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Sign this.
    Allow(Allowed),
    /// Sign nothing.
    Deny(Denied),
}

fn matches(sel: &Selector, req: &Request<'_>) -> bool {
    let any =
        |globs: &[crate::Glob], v: Option<&str>| globs.iter().any(|g| g.matches(v.unwrap_or("")));
    (sel.authenticators.is_empty() || sel.authenticators.iter().any(|a| a == req.authenticator))
        && any(&sel.clusters, req.cluster)
        && any(&sel.namespaces, req.namespace)
        && any(&sel.service_accounts, req.service_account)
}

fn deny(kind: DenyKind, rule: &str, reason: String) -> Decision {
    Decision::Deny(Denied {
        kind,
        rule: rule.to_owned(),
        reason,
    })
}

fn fmt(d: Duration) -> String {
    crate::format_duration(d)
}

/// Decides a request.
pub fn evaluate(policy: &Policy, req: &Request<'_>) -> Decision {
    let d = &policy.defaults;
    if !d.key_types.iter().any(|k| k == req.key_type) {
        return deny(
            DenyKind::InvalidRequest,
            "defaults.key_types",
            format!(
                "key type {} is not allowed (allowed: {})",
                req.key_type,
                d.key_types.join(", ")
            ),
        );
    }
    if let Some(l) = req.lifetime {
        if l > d.max_lifetime {
            return deny(
                DenyKind::InvalidRequest,
                "defaults.max_lifetime",
                format!(
                    "requested TTL {} is greater than the max allowed TTL {}",
                    fmt(l),
                    fmt(d.max_lifetime)
                ),
            );
        }
        if l < d.min_lifetime {
            return deny(
                DenyKind::InvalidRequest,
                "defaults.min_lifetime",
                format!(
                    "requested TTL {} is below the minimum {}",
                    fmt(l),
                    fmt(d.min_lifetime)
                ),
            );
        }
    }
    if let Some(rule) = policy.deny.iter().find(|r| matches(&r.selector, req)) {
        return deny(DenyKind::Refused, &rule.name, rule.reason.clone());
    }
    let caller = format!(
        "{} caller {}/{}/{}",
        req.authenticator,
        req.cluster.unwrap_or("-"),
        req.namespace.unwrap_or("-"),
        req.service_account.unwrap_or("-")
    );
    let Some(rule) = policy.rules.iter().find(|r| matches(&r.selector, req)) else {
        return deny(
            DenyKind::Refused,
            "no-matching-rule",
            format!("no rule allows the {caller}"),
        );
    };
    if !rule.key_types.iter().any(|k| k == req.key_type) {
        return deny(
            DenyKind::Refused,
            &rule.name,
            format!(
                "key type {} is not allowed by rule {} (allowed: {})",
                req.key_type,
                rule.name,
                rule.key_types.join(", ")
            ),
        );
    }
    let lifetime = match req.lifetime {
        Some(l) if l > rule.max_lifetime => {
            return deny(
                DenyKind::Refused,
                &rule.name,
                format!(
                    "requested TTL {} is greater than rule {}'s max_lifetime {}",
                    fmt(l),
                    rule.name,
                    fmt(rule.max_lifetime)
                ),
            );
        }
        Some(l) => l,
        None => d.lifetime.min(rule.max_lifetime),
    };
    let vars = Vars {
        trust_domain: &policy.trust_domain,
        cluster: req.cluster,
        namespace: req.namespace,
        service_account: req.service_account,
        pod: req.pod,
    };
    let mut uri_sans = Vec::new();
    if let Some(id) = req.impersonated {
        uri_sans.push(id.to_owned());
    } else {
        for t in &rule.uri_sans {
            match t.render(&vars) {
                Ok(s) => uri_sans.push(s),
                Err(e) => {
                    return deny(
                        DenyKind::Refused,
                        &rule.name,
                        format!("template {:?} renders no valid name: {e}", t.source()),
                    );
                }
            }
        }
        if req.authenticator == "client-cert" {
            uri_sans.retain(|u| req.identities.contains(u));
            if uri_sans.is_empty() {
                return deny(
                    DenyKind::Refused,
                    &rule.name,
                    "a client-certificate caller gets only identities present in its certificate, and none matches the rule's templates".into(),
                );
            }
        }
    }
    uri_sans.dedup();
    let mut dns_sans = Vec::new();
    for t in &rule.dns_sans {
        if let Ok(name) = t.render(&vars)
            && req.csr_dns_sans.contains(&name)
            && !dns_sans.contains(&name)
        {
            dns_sans.push(name);
        }
    }
    if d.csr_sans == CsrSans::Deny {
        let extra: Vec<&String> = req
            .csr_uri_sans
            .iter()
            .filter(|u| !uri_sans.contains(u))
            .chain(req.csr_dns_sans.iter().filter(|n| !dns_sans.contains(n)))
            .collect();
        if !extra.is_empty() {
            return deny(
                DenyKind::Refused,
                &rule.name,
                format!(
                    "the CSR asks for {extra:?}, which rule {} does not produce for this caller",
                    rule.name
                ),
            );
        }
    }
    let common_name =
        (req.csr_has_common_name && uri_sans[0].len() <= 64).then(|| uri_sans[0].clone());
    let key_usages = if req.key_type.starts_with("rsa") {
        vec!["digitalSignature", "keyEncipherment"]
    } else {
        vec!["digitalSignature"]
    };
    Decision::Allow(Allowed {
        rule: rule.name.clone(),
        uri_sans,
        dns_sans,
        common_name,
        not_before: req.now,
        not_after: req.now + lifetime,
        key_usages,
    })
}
