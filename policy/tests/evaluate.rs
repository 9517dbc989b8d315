//! Table-driven tests of the evaluator, and property tests of its promises.

use std::time::{Duration, SystemTime};

use hsmca_policy::{Decision, DenyKind, Policy, Request, evaluate};
use proptest::prelude::*;

const POLICY: &str = r#"
version = 1
trust_domain = "cluster.local"

[defaults]
lifetime = "24h"
max_lifetime = "90d"
min_lifetime = "5m"
key_types = ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
csr_sans = "ignore"

[[deny]]
name = "no-kube-system"
namespaces = ["kube-system"]
reason = "workloads in kube-system get no mesh identity"

[[rule]]
name = "payments"
authenticators = ["kube-jwt"]
clusters = ["prod-*"]
namespaces = ["payments"]
service_accounts = ["*"]
uri_sans = ["spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"]
dns_sans = ["{service_account}.{namespace}.svc"]
max_lifetime = "1h"
key_types = ["ecdsa-p256"]

[[rule]]
name = "mesh"
authenticators = ["kube-jwt", "client-cert"]
clusters = ["*"]
namespaces = ["*"]
service_accounts = ["*"]
uri_sans = ["spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"]
dns_sans = ["{service_account}.{namespace}.svc"]
max_lifetime = "24h"
key_types = ["ecdsa-p256", "rsa-2048"]
"#;

fn policy() -> Policy {
    Policy::parse("test.toml", POLICY).unwrap()
}

struct Case {
    name: &'static str,
    authenticator: &'static str,
    cluster: &'static str,
    namespace: &'static str,
    sa: &'static str,
    key: &'static str,
    ttl: Option<u64>,
    csr_dns: &'static [&'static str],
    want: Result<(&'static str, u64), (DenyKind, &'static str)>,
}

fn run(p: &Policy, c: &Case) -> Decision {
    let identities = vec![format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        c.namespace, c.sa
    )];
    let dns: Vec<String> = c.csr_dns.iter().map(|s| s.to_string()).collect();
    evaluate(
        p,
        &Request {
            authenticator: c.authenticator,
            identities: &identities,
            cluster: Some(c.cluster),
            namespace: Some(c.namespace),
            service_account: Some(c.sa),
            pod: None,
            key_type: c.key,
            csr_uri_sans: &[],
            csr_dns_sans: &dns,
            csr_has_common_name: false,
            lifetime: c.ttl.map(Duration::from_secs),
            impersonated: None,
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        },
    )
}

#[test]
fn table() {
    let p = policy();
    let cases = [
        Case {
            name: "mesh default",
            authenticator: "kube-jwt",
            cluster: "c1",
            namespace: "foo",
            sa: "httpbin",
            key: "ecdsa-p256",
            ttl: None,
            csr_dns: &[],
            want: Ok(("mesh", 86_400)),
        },
        Case {
            name: "requested ttl",
            authenticator: "kube-jwt",
            cluster: "c1",
            namespace: "foo",
            sa: "httpbin",
            key: "rsa-2048",
            ttl: Some(3600),
            csr_dns: &[],
            want: Ok(("mesh", 3600)),
        },
        Case {
            name: "denied namespace",
            authenticator: "kube-jwt",
            cluster: "c1",
            namespace: "kube-system",
            sa: "x",
            key: "ecdsa-p256",
            ttl: None,
            csr_dns: &[],
            want: Err((DenyKind::Refused, "no-kube-system")),
        },
        Case {
            name: "above default max",
            authenticator: "kube-jwt",
            cluster: "c1",
            namespace: "foo",
            sa: "a",
            key: "ecdsa-p256",
            ttl: Some(91 * 86_400),
            csr_dns: &[],
            want: Err((DenyKind::InvalidRequest, "defaults.max_lifetime")),
        },
        Case {
            name: "below min",
            authenticator: "kube-jwt",
            cluster: "c1",
            namespace: "foo",
            sa: "a",
            key: "ecdsa-p256",
            ttl: Some(60),
            csr_dns: &[],
            want: Err((DenyKind::InvalidRequest, "defaults.min_lifetime")),
        },
        Case {
            name: "rule max tighter",
            authenticator: "kube-jwt",
            cluster: "c1",
            namespace: "foo",
            sa: "a",
            key: "ecdsa-p256",
            ttl: Some(2 * 86_400),
            csr_dns: &[],
            want: Err((DenyKind::Refused, "mesh")),
        },
        Case {
            name: "payments default capped to 1h",
            authenticator: "kube-jwt",
            cluster: "prod-eu",
            namespace: "payments",
            sa: "api",
            key: "ecdsa-p256",
            ttl: None,
            csr_dns: &[],
            want: Ok(("payments", 3600)),
        },
        Case {
            name: "payments rsa refused",
            authenticator: "kube-jwt",
            cluster: "prod-eu",
            namespace: "payments",
            sa: "api",
            key: "rsa-2048",
            ttl: None,
            csr_dns: &[],
            want: Err((DenyKind::Refused, "payments")),
        },
        Case {
            name: "payments outside prod falls to mesh",
            authenticator: "kube-jwt",
            cluster: "dev",
            namespace: "payments",
            sa: "api",
            key: "rsa-2048",
            ttl: None,
            csr_dns: &[],
            want: Ok(("mesh", 86_400)),
        },
        Case {
            name: "jwt authenticator not allowed",
            authenticator: "jwt",
            cluster: "c1",
            namespace: "foo",
            sa: "a",
            key: "ecdsa-p256",
            ttl: None,
            csr_dns: &[],
            want: Err((DenyKind::Refused, "no-matching-rule")),
        },
        Case {
            name: "key type not in defaults",
            authenticator: "kube-jwt",
            cluster: "c1",
            namespace: "foo",
            sa: "a",
            key: "rsa-1024",
            ttl: None,
            csr_dns: &[],
            want: Err((DenyKind::InvalidRequest, "defaults.key_types")),
        },
        Case {
            name: "key type not in rule",
            authenticator: "kube-jwt",
            cluster: "c1",
            namespace: "foo",
            sa: "a",
            key: "ecdsa-p384",
            ttl: None,
            csr_dns: &[],
            want: Err((DenyKind::Refused, "mesh")),
        },
        Case {
            name: "invalid namespace renders no name",
            authenticator: "kube-jwt",
            cluster: "c1",
            namespace: "Foo!",
            sa: "a",
            key: "ecdsa-p256",
            ttl: None,
            csr_dns: &[],
            want: Err((DenyKind::Refused, "mesh")),
        },
    ];
    for c in &cases {
        match (run(&p, c), &c.want) {
            (Decision::Allow(a), Ok((rule, secs))) => {
                assert_eq!(a.rule, *rule, "{}", c.name);
                assert_eq!(
                    a.not_after.duration_since(a.not_before).unwrap().as_secs(),
                    *secs,
                    "{}",
                    c.name
                );
                assert_eq!(
                    a.uri_sans,
                    vec![format!(
                        "spiffe://cluster.local/ns/{}/sa/{}",
                        c.namespace, c.sa
                    )],
                    "{}",
                    c.name
                );
            }
            (Decision::Deny(d), Err((kind, rule))) => {
                assert_eq!(
                    (d.kind, d.rule.as_str()),
                    (*kind, *rule),
                    "{}: {}",
                    c.name,
                    d.reason
                );
                assert!(!d.reason.is_empty());
            }
            (got, want) => panic!("{}: got {got:?}, want {want:?}", c.name),
        }
    }
}

#[test]
fn dns_sans_only_when_asked_and_rendered() {
    let p = policy();
    let base = Case {
        name: "dns",
        authenticator: "kube-jwt",
        cluster: "c1",
        namespace: "foo",
        sa: "web",
        key: "ecdsa-p256",
        ttl: None,
        csr_dns: &["web.foo.svc", "evil.com"],
        want: Ok(("mesh", 0)),
    };
    let Decision::Allow(a) = run(&p, &base) else {
        panic!("denied")
    };
    assert_eq!(a.dns_sans, vec!["web.foo.svc".to_string()]);
    let none = Case {
        csr_dns: &[],
        ..base
    };
    let Decision::Allow(a) = run(&p, &none) else {
        panic!("denied")
    };
    assert!(a.dns_sans.is_empty());
}

#[test]
fn csr_sans_deny_refuses_unrendered_names() {
    let p = Policy::parse(
        "t.toml",
        &POLICY.replace("csr_sans = \"ignore\"", "csr_sans = \"deny\""),
    )
    .unwrap();
    let c = Case {
        name: "deny",
        authenticator: "kube-jwt",
        cluster: "c1",
        namespace: "foo",
        sa: "web",
        key: "ecdsa-p256",
        ttl: None,
        csr_dns: &["evil.com"],
        want: Ok(("mesh", 0)),
    };
    match run(&p, &c) {
        Decision::Deny(d) => assert!(d.reason.contains("evil.com"), "{}", d.reason),
        other => panic!("{other:?}"),
    }
    let ok = Case {
        csr_dns: &["web.foo.svc"],
        ..c
    };
    assert!(matches!(run(&p, &ok), Decision::Allow(_)));
}

#[test]
fn client_cert_caller_gets_only_its_own_identities() {
    let p = policy();
    let identities = vec!["spiffe://cluster.local/ns/foo/sa/other".to_string()];
    let d = evaluate(
        &p,
        &Request {
            authenticator: "client-cert",
            identities: &identities,
            cluster: None,
            namespace: Some("foo"),
            service_account: Some("web"),
            pod: None,
            key_type: "ecdsa-p256",
            csr_uri_sans: &[],
            csr_dns_sans: &[],
            csr_has_common_name: false,
            lifetime: None,
            impersonated: None,
            now: SystemTime::now(),
        },
    );
    assert!(matches!(d, Decision::Deny(_)), "{d:?}");
}

#[test]
fn loading_reports_file_line_and_reason() {
    let cases = [
        ("version = 1\nbogus = 3\n", 2, "unknown field"),
        (
            "version = 1\n[defaults]\nlifetime = \"24x\"\n",
            2,
            "defaults.lifetime",
        ),
        (
            "version = 1\n[[rule]]\nname = \"r\"\nauthenticators = [\"kube-jwt\"]\nuri_sans = [\"spiffe://{td}/x\"]\n",
            2,
            "unknown variable {td}",
        ),
        (
            "version = 1\n[[rule]]\nname = \"r\"\nauthenticators = [\"kube-jwt\"]\nuri_sans = [\"spiffe://x/y\"]\nmax_lifetime = \"100d\"\n",
            2,
            "loosens",
        ),
        (
            "version = 1\n\n[[rule]]\nname = \"r\"\nauthenticators = [\"kube-jwt\"]\nnamespaces = [\"a/b\"]\nuri_sans = [\"spiffe://x/y\"]\n",
            3,
            "namespaces",
        ),
        (
            "version = 1\n[[rule]]\nname = \"r\"\nauthenticators = [\"ldap\"]\nuri_sans = [\"spiffe://x/y\"]\n",
            2,
            "unknown authenticator",
        ),
        (
            "version = 1\n[[rule]]\nname = \"r\"\nauthenticators = [\"kube-jwt\"]\nuri_sans = [\"spiffe://x/y\"]\nkey_types = [\"rsa-1024\"]\n",
            2,
            "unknown key type",
        ),
        ("version = 2\n", 1, "version 2"),
    ];
    for (text, line, needle) in cases {
        let e = Policy::parse("p.toml", text).unwrap_err();
        assert_eq!(e.file, "p.toml");
        assert_eq!(e.line, line, "{text:?}: {e}");
        assert!(e.to_string().contains(needle), "{text:?}: {e}");
    }
}

#[test]
fn builtin_default_is_istio() {
    let p = Policy::istio_default(
        "example.org",
        Duration::from_secs(86_400),
        Duration::from_secs(90 * 86_400),
    )
    .unwrap();
    let c = Case {
        name: "d",
        authenticator: "kube-jwt",
        cluster: "Kubernetes",
        namespace: "foo",
        sa: "httpbin",
        key: "rsa-2048",
        ttl: Some(90 * 86_400),
        csr_dns: &["a.b"],
        want: Ok(("", 0)),
    };
    let Decision::Allow(a) = run(&p, &c) else {
        panic!()
    };
    assert_eq!(
        a.uri_sans,
        vec!["spiffe://example.org/ns/foo/sa/httpbin".to_string()]
    );
    assert!(a.dns_sans.is_empty());
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9-]{0,12}|kube-system|payments|[A-Z!/]{1,3}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn promises_hold(
        ns in name(), sa in name(), cluster in name(),
        auth in prop::sample::select(vec!["kube-jwt", "client-cert", "jwt"]),
        key in prop::sample::select(vec!["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-4096", "rsa-1024"]),
        ttl in prop::option::of(0u64..200 * 86_400),
        csr_dns in prop::collection::vec(name().prop_map(|n| format!("{n}.svc")), 0..3),
        csr_uri in prop::collection::vec(name().prop_map(|n| format!("spiffe://cluster.local/ns/{n}/sa/x")), 0..2),
    ) {
        let p = policy();
        let identities = vec![format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")];
        let req = Request {
            authenticator: auth,
            identities: &identities,
            cluster: Some(&cluster),
            namespace: Some(&ns),
            service_account: Some(&sa),
            pod: None,
            key_type: key,
            csr_uri_sans: &csr_uri,
            csr_dns_sans: &csr_dns,
            csr_has_common_name: false,
            lifetime: ttl.map(Duration::from_secs),
            impersonated: None,
            now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        };
        if let Decision::Allow(a) = evaluate(&p, &req) {
            // Never past a deny rule.
            prop_assert_ne!(ns.as_str(), "kube-system");
            // Every SAN was rendered by a template of the matched rule for this caller.
            let rule = p.rules.iter().find(|r| r.name == a.rule).unwrap();
            let vars = hsmca_policy::Vars { trust_domain: "cluster.local", cluster: Some(&cluster), namespace: Some(&ns), service_account: Some(&sa), pod: None };
            for u in &a.uri_sans {
                prop_assert!(rule.uri_sans.iter().any(|t| t.render(&vars).as_ref() == Ok(u)));
            }
            for d in &a.dns_sans {
                prop_assert!(rule.dns_sans.iter().any(|t| t.render(&vars).as_ref() == Ok(d)));
                prop_assert!(csr_dns.contains(d));
            }
            // No lifetime above any cap.
            let life = a.not_after.duration_since(a.not_before).unwrap();
            prop_assert!(life <= rule.max_lifetime && life <= p.defaults.max_lifetime);
            prop_assert!(rule.key_types.iter().any(|k| k == key));
            prop_assert!(rule.selector.authenticators.iter().any(|x| x == auth));
        }
    }
}
