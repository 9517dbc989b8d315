//! `hsmca policy check`: explain a policy decision without touching an HSM.

use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use hsmca_policy::{
    Decision, DenyKind, Policy, Request, evaluate, format_duration, parse_duration,
};

use super::PolicyCheckArgs;
use crate::ca::CLOCK_SKEW;

/// Exit code of a denied request.
pub const DENIED: i32 = 3;

pub(super) fn run(args: &PolicyCheckArgs) -> anyhow::Result<i32> {
    let text = std::fs::read_to_string(&args.policy)
        .with_context(|| format!("reading {}", args.policy.display()))?;
    let policy = Policy::parse(&args.policy.display().to_string(), &text)?;
    let (authenticator, rest) = args
        .caller
        .split_once(':')
        .context("--caller is AUTHENTICATOR:CLUSTER/NAMESPACE/SERVICE_ACCOUNT")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [cluster, namespace, service_account] = parts.as_slice() else {
        bail!(
            "--caller is AUTHENTICATOR:CLUSTER/NAMESPACE/SERVICE_ACCOUNT, e.g. kube-jwt:cluster1/foo/httpbin"
        );
    };
    // The server knows no cluster for a client-certificate caller; "-" (or empty) says so.
    let cluster: Option<&str> = match *cluster {
        "" | "-" => None,
        c if authenticator == "client-cert" => bail!(
            "a client-cert caller carries no cluster (the server knows none): write {authenticator}:-/{namespace}/{service_account}, not {c:?}"
        ),
        c => Some(c),
    };
    let csr = match &args.csr {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(crate::issuance::check_csr(&pem)?)
        }
        None => None,
    };
    let lifetime = args
        .ttl
        .as_deref()
        .map(parse_duration)
        .transpose()
        .context("--ttl")?;
    let identities = vec![format!(
        "spiffe://{}/ns/{namespace}/sa/{service_account}",
        policy.trust_domain
    )];
    let empty = Vec::new();
    let now = SystemTime::now();
    let request = Request {
        authenticator,
        identities: &identities,
        cluster,
        namespace: Some(namespace),
        service_account: Some(service_account),
        pod: None,
        key_type: csr
            .as_ref()
            .map_or(args.key_type.as_str(), |c| c.key_type.as_str()),
        csr_uri_sans: csr.as_ref().map_or(&empty, |c| &c.uri_sans),
        csr_dns_sans: csr.as_ref().map_or(&empty, |c| &c.dns_sans),
        csr_has_common_name: csr.as_ref().is_some_and(|c| c.has_common_name),
        lifetime,
        impersonated: None,
        now,
    };
    println!(
        "policy:   {} (version {})",
        args.policy.display(),
        &policy.version_hash[..16]
    );
    println!(
        "caller:   {authenticator} {}/{namespace}/{service_account}",
        cluster.unwrap_or("-")
    );
    match evaluate(&policy, &request) {
        Decision::Allow(a) => {
            let life = a
                .not_after
                .duration_since(a.not_before)
                .unwrap_or(Duration::ZERO);
            println!("decision: ALLOW by rule {:?}", a.rule);
            println!("certificate it would issue:");
            println!(
                "  subject:            {}",
                a.common_name
                    .as_deref()
                    .map_or("(empty)".to_string(), |cn| format!("CN={cn}"))
            );
            println!("  URI SANs:           {}", a.uri_sans.join(", "));
            println!(
                "  DNS SANs:           {}",
                if a.dns_sans.is_empty() {
                    "(none)".to_string()
                } else {
                    a.dns_sans.join(", ")
                }
            );
            println!(
                "  lifetime:           {} (+{} clock-skew allowance before now)",
                format_duration(life),
                format_duration(CLOCK_SKEW)
            );
            println!("  key type:           {}", request.key_type);
            println!("  key usage:          {}", a.key_usages.join(", "));
            println!("  extended key usage: serverAuth, clientAuth");
            Ok(0)
        }
        Decision::Deny(d) => {
            println!("decision: DENY by {}", d.rule);
            println!("reason:   {}", d.reason);
            println!(
                "status:   {}",
                match d.kind {
                    DenyKind::InvalidRequest => "InvalidArgument",
                    _ => "PermissionDenied",
                }
            );
            Ok(DENIED)
        }
    }
}
