//! Property-based fuzzing on stable of everything that parses untrusted input: CSRs, the gRPC
//! request message, policy files, and the SDS stream state machine. No input may panic, hang or
//! be accepted wrongly. `HSMCA_FUZZ_CASES` sets the number of cases per target (CI runs a longer
//! smoke; the default keeps `cargo test` quick).

use hsmca::agent::stream_state::{Action, Incoming, StreamState};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

fn runner() -> TestRunner {
    let cases = std::env::var("HSMCA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

fn valid_csr() -> String {
    hsmca::agent::workload_key::generate(
        hsmca::agent::WorkloadKeyType::EcdsaP256,
        "spiffe://cluster.local/ns/foo/sa/bar",
    )
    .unwrap()
    .csr_pem
}

fn pem_body(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        lines.join("\n")
    )
}

#[test]
fn csr_parsing_never_panics_and_mutated_csrs_never_verify() {
    let der = pem_body(&valid_csr());
    let mut r = runner();
    // Arbitrary text.
    r.run(&".{0,3000}", |s| {
        let _ = hsmca::issuance::check_csr(&s);
        Ok(())
    })
    .unwrap();
    // Flipped bytes, truncations and insertions in a valid CSR's DER. A flip inside the signed
    // part or the signature must never verify; parsing must never panic.
    let len = der.len();
    r.run(
        &(0..len, any::<u8>(), 0..len, prop::bool::ANY),
        |(at, xor, cut, truncate)| {
            let mut m = der.clone();
            if truncate {
                m.truncate(cut);
            } else {
                m[at] ^= xor.max(1);
            }
            if let Ok(csr) = hsmca::issuance::check_csr(&to_pem(&m)) {
                // Only re-encodings that keep the signed bytes and the signature may pass.
                prop_assert!(!truncate, "a truncated CSR verified");
                prop_assert_eq!(csr.key_type.as_str(), "ecdsa-p256");
            }
            Ok(())
        },
    )
    .unwrap();
}

#[test]
fn request_decoding_never_panics() {
    use prost::Message;
    let mut r = runner();
    r.run(&prop::collection::vec(any::<u8>(), 0..4096), |bytes| {
        if let Ok(req) = hsmca_proto::IstioCertificateRequest::decode(bytes.as_slice()) {
            let _ = hsmca::issuance::check_csr(&req.csr);
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn policy_parsing_never_panics() {
    let example = include_str!("../examples/policy/policy.toml");
    let mut r = runner();
    r.run(&".{0,2000}", |s| {
        let _ = hsmca_policy::Policy::parse("fuzz.toml", &s);
        Ok(())
    })
    .unwrap();
    let len = example.len();
    r.run(
        &(0..len, 0..len, "[a-z0-9{}\\[\\]=\"*,.\n -]{0,20}"),
        |(a, b, insert)| {
            let (a, b) = (a.min(b), a.max(b));
            if !example.is_char_boundary(a) || !example.is_char_boundary(b) {
                return Ok(());
            }
            let text = format!("{}{}{}", &example[..a], insert, &example[b..]);
            if let Ok(p) = hsmca_policy::Policy::parse("fuzz.toml", &text) {
                // Whatever loads keeps its promises: rules never loosen the defaults.
                for rule in &p.rules {
                    prop_assert!(rule.max_lifetime <= p.defaults.max_lifetime);
                    prop_assert!(
                        rule.key_types
                            .iter()
                            .all(|k| p.defaults.key_types.contains(k))
                    );
                }
            }
            Ok(())
        },
    )
    .unwrap();
}

#[derive(Debug, Clone)]
struct Req {
    node: Option<String>,
    names: Vec<String>,
    nonce_pick: u8,
    nack: bool,
}

fn req() -> impl Strategy<Value = Req> {
    (
        prop::option::of(prop::sample::select(vec!["", "sidecar~1"]).prop_map(String::from)),
        prop::collection::vec(
            prop::sample::select(vec!["default", "ROOTCA", "other"]).prop_map(String::from),
            0..4,
        ),
        any::<u8>(),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(node, names, nonce_pick, nack)| Req {
            node,
            names,
            nonce_pick,
            nack,
        })
}

#[test]
fn sds_state_machine_keeps_istios_rules() {
    let mut r = runner();
    r.run(&prop::collection::vec(req(), 1..30), |reqs| {
        let mut s = StreamState::default();
        let mut sent: Vec<String> = Vec::new();
        let mut has_node = false;
        for q in reqs {
            let nonce = match (q.nonce_pick % 3, sent.last()) {
                (0, _) | (_, None) => String::new(),
                (1, Some(n)) => n.clone(),
                _ => "stale".to_owned(),
            };
            let incoming = Incoming {
                node_id: q.node.as_deref(),
                names: &q.names,
                nonce: &nonce,
                error: q.nack.then_some("rejected"),
            };
            match s.on_request(&incoming) {
                Err(_) => {
                    // Only a stream that never named its node may be refused.
                    prop_assert!(!has_node);
                    prop_assert!(q.node.as_deref().unwrap_or("").is_empty());
                    return Ok(());
                }
                Ok(action) => {
                    has_node = true;
                    match action {
                        Action::Respond(names) => {
                            prop_assert!(!q.nack, "a NACK was answered");
                            prop_assert!(!names.is_empty());
                            prop_assert!(
                                names.iter().all(|n| q.names.contains(n)),
                                "answered a name not asked for"
                            );
                            prop_assert!(
                                nonce != "stale" || sent.is_empty(),
                                "answered a stale nonce"
                            );
                            let n = format!("n{}", sent.len());
                            s.sent(n.clone());
                            sent.push(n);
                        }
                        Action::Nack(_) => prop_assert!(q.nack),
                        Action::Ignore(_) => {}
                    }
                }
            }
        }
        Ok(())
    })
    .unwrap();
}
