//! One deliberately broken TBS per lint: each must be refused, naming the lint, and nothing
//! may reach the signer.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use der::asn1::OctetString;
use der::{Encode, oid::AssociatedOid};
use hsmca_hsm::{KeyAlgorithm, Signer};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages, SubjectAltName};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;

use crate::issuance::test_signer::SoftwareSigner;
use crate::issuance::{
    CertKind, CertTemplate, IssueError, IssuerInfo, intermediate_extensions, issue, key_identifier,
    leaf_extensions, lint, prepare, random_serial,
};

const ID: &str = "spiffe://cluster.local/ns/foo/sa/httpbin";

struct Fixture {
    issuer_signer: SoftwareSigner,
    issuer: IssuerInfo,
    subject_key: hsmca_hsm::PublicKey,
    now: SystemTime,
}

fn fixture() -> Fixture {
    let issuer_signer = SoftwareSigner::new();
    let now = SystemTime::now();
    let issuer = IssuerInfo {
        name: Name::from_str("CN=test intermediate,O=cluster.local").unwrap(),
        ski: key_identifier(&issuer_signer.public_key().subject_public_key_bytes()),
        not_after: Some(now + Duration::from_secs(365 * 86_400)),
        public_key: issuer_signer.public_key().clone(),
        algorithm: KeyAlgorithm::EcdsaP256,
    };
    Fixture {
        subject_key: SoftwareSigner::new().public_key().clone(),
        issuer_signer,
        issuer,
        now,
    }
}

fn ext<T: Encode + AssociatedOid>(v: &T, critical: bool) -> Extension {
    Extension {
        extn_id: T::OID,
        critical,
        extn_value: OctetString::new(v.to_der().unwrap()).unwrap(),
    }
}

fn leaf(f: &Fixture) -> CertTemplate {
    CertTemplate {
        kind: CertKind::Leaf,
        serial: random_serial(),
        subject: Name::default(),
        not_before: f.now - Duration::from_secs(120),
        not_after: f.now + Duration::from_secs(86_400),
        public_key: f.subject_key.clone(),
        extensions: leaf_extensions(false, &f.issuer.ski, &[ID.into()], &[], true).unwrap(),
    }
}

fn assert_refused(f: &Fixture, t: CertTemplate, lint_name: &str) {
    let prepared = prepare(t, &f.issuer).unwrap();
    let err = match lint(prepared) {
        Ok(_) => panic!("lint {lint_name} did not fire"),
        Err(e) => e,
    };
    assert!(
        err.findings
            .iter()
            .any(|x| x.starts_with(&format!("{lint_name}:"))),
        "expected {lint_name}, got {:?}",
        err.findings
    );
    assert_eq!(
        f.issuer_signer.signatures.load(Ordering::SeqCst),
        0,
        "nothing may be signed"
    );
}

fn replace(t: &mut CertTemplate, e: Extension) {
    t.extensions.retain(|x| x.extn_id != e.extn_id);
    t.extensions.push(e);
}

#[test]
fn a_good_leaf_passes_and_is_signed_once() {
    let f = fixture();
    let linted = lint(prepare(leaf(&f), &f.issuer).unwrap()).unwrap();
    let linted_der = linted.tbs_der().to_vec();
    let cert = issue(linted, &f.issuer_signer).unwrap();
    assert_eq!(f.issuer_signer.signatures.load(Ordering::SeqCst), 1);
    assert_eq!(cert.tbs_certificate().to_der().unwrap(), linted_der);
}

#[test]
fn the_signer_must_hold_the_issuer_key() {
    let f = fixture();
    let linted = lint(prepare(leaf(&f), &f.issuer).unwrap()).unwrap();
    let other = SoftwareSigner::new();
    assert!(matches!(
        issue(linted, &other),
        Err(IssueError::PostCheck(_))
    ));
    assert_eq!(other.signatures.load(Ordering::SeqCst), 0);
}

#[test]
fn serial_with_too_little_entropy() {
    let f = fixture();
    let mut t = leaf(&f);
    t.serial = SerialNumber::new(&[0x01, 0x02, 0x03]).unwrap();
    assert_refused(&f, t, "serial_entropy");
}

#[test]
fn not_after_before_not_before() {
    let f = fixture();
    let mut t = leaf(&f);
    t.not_after = t.not_before - Duration::from_secs(60);
    assert_refused(&f, t, "validity_order");
}

#[test]
fn not_after_past_the_issuer() {
    let f = fixture();
    let mut t = leaf(&f);
    t.not_after = f.now + Duration::from_secs(400 * 86_400);
    assert_refused(&f, t, "validity_within_issuer");
}

#[test]
fn leaf_with_ca_true() {
    let f = fixture();
    let mut t = leaf(&f);
    replace(
        &mut t,
        ext(
            &BasicConstraints {
                ca: true,
                path_len_constraint: None,
            },
            true,
        ),
    );
    assert_refused(&f, t, "leaf_not_ca");
}

#[test]
fn leaf_without_san() {
    let f = fixture();
    let mut t = leaf(&f);
    t.extensions.retain(|e| e.extn_id != SubjectAltName::OID);
    assert_refused(&f, t, "leaf_san");
}

#[test]
fn san_not_critical_with_empty_subject() {
    let f = fixture();
    let mut t = leaf(&f);
    t.extensions = leaf_extensions(false, &f.issuer.ski, &[ID.into()], &[], false).unwrap();
    assert_refused(&f, t, "san_critical");
}

#[test]
fn two_uri_sans() {
    let f = fixture();
    let mut t = leaf(&f);
    t.extensions = leaf_extensions(
        false,
        &f.issuer.ski,
        &[ID.into(), "spiffe://cluster.local/ns/a/sa/b".into()],
        &[],
        true,
    )
    .unwrap();
    assert_refused(&f, t, "spiffe_one_uri");
}

#[test]
fn invalid_spiffe_id() {
    let f = fixture();
    let mut t = leaf(&f);
    t.extensions = leaf_extensions(
        false,
        &f.issuer.ski,
        &["spiffe://cluster.local/ns//sa/x".into()],
        &[],
        true,
    )
    .unwrap();
    assert_refused(&f, t, "spiffe_id");
}

#[test]
fn wildcard_dns_name() {
    let f = fixture();
    let mut t = leaf(&f);
    t.extensions = leaf_extensions(
        false,
        &f.issuer.ski,
        &[ID.into()],
        &["*.foo.svc".into()],
        true,
    )
    .unwrap();
    assert_refused(&f, t, "san_wildcard");
}

#[test]
fn key_encipherment_on_an_ec_key() {
    let f = fixture();
    let mut t = leaf(&f);
    t.extensions = leaf_extensions(true, &f.issuer.ski, &[ID.into()], &[], true).unwrap();
    assert_refused(&f, t, "leaf_key_usage");
}

#[test]
fn key_cert_sign_on_a_leaf() {
    let f = fixture();
    let mut t = leaf(&f);
    replace(
        &mut t,
        ext(
            &KeyUsage(KeyUsages::DigitalSignature | KeyUsages::KeyCertSign),
            true,
        ),
    );
    assert_refused(&f, t, "leaf_key_usage");
}

#[test]
fn leaf_without_eku() {
    let f = fixture();
    let mut t = leaf(&f);
    t.extensions
        .retain(|e| e.extn_id != x509_cert::ext::pkix::ExtendedKeyUsage::OID);
    assert_refused(&f, t, "leaf_extended_key_usage");
}

#[test]
fn wrong_authority_key_identifier() {
    let f = fixture();
    let mut t = leaf(&f);
    t.extensions = leaf_extensions(false, &[0u8; 20], &[ID.into()], &[], true).unwrap();
    assert_refused(&f, t, "authority_key_identifier");
}

#[test]
fn duplicate_extension() {
    let f = fixture();
    let mut t = leaf(&f);
    let dup = t.extensions[0].clone();
    t.extensions.push(dup);
    assert_refused(&f, t, "duplicate_extension");
}

#[test]
fn signature_algorithm_that_does_not_fit_the_issuer_key() {
    let mut f = fixture();
    f.issuer.algorithm = KeyAlgorithm::EcdsaP384;
    assert_refused(&f, leaf(&f), "signature_algorithm");
}

fn intermediate(f: &Fixture) -> CertTemplate {
    let ski = key_identifier(&f.subject_key.subject_public_key_bytes());
    CertTemplate {
        kind: CertKind::Intermediate,
        serial: random_serial(),
        subject: Name::from_str("CN=sub CA,O=cluster.local").unwrap(),
        not_before: f.now,
        not_after: f.now + Duration::from_secs(86_400),
        public_key: f.subject_key.clone(),
        extensions: intermediate_extensions(&ski, &f.issuer.ski),
    }
}

#[test]
fn a_good_intermediate_passes() {
    let f = fixture();
    assert!(lint(prepare(intermediate(&f), &f.issuer).unwrap()).is_ok());
}

#[test]
fn intermediate_without_path_len_zero() {
    let f = fixture();
    let mut t = intermediate(&f);
    replace(
        &mut t,
        ext(
            &BasicConstraints {
                ca: true,
                path_len_constraint: Some(3),
            },
            true,
        ),
    );
    assert_refused(&f, t, "ca_path_len");
}

#[test]
fn ca_without_key_cert_sign() {
    let f = fixture();
    let mut t = intermediate(&f);
    replace(
        &mut t,
        ext(&KeyUsage(KeyUsages::DigitalSignature.into()), true),
    );
    assert_refused(&f, t, "ca_key_usage");
}

#[test]
fn ca_without_subject_key_identifier() {
    let f = fixture();
    let mut t = intermediate(&f);
    t.extensions
        .retain(|e| e.extn_id != x509_cert::ext::pkix::SubjectKeyIdentifier::OID);
    assert_refused(&f, t, "ca_subject_key_identifier");
}

#[test]
fn ca_with_empty_subject() {
    let f = fixture();
    let mut t = intermediate(&f);
    t.subject = Name::default();
    assert_refused(&f, t, "ca_subject");
}

#[test]
fn ca_basic_constraints_not_critical() {
    let f = fixture();
    let mut t = intermediate(&f);
    replace(
        &mut t,
        ext(
            &BasicConstraints {
                ca: true,
                path_len_constraint: Some(0),
            },
            false,
        ),
    );
    assert_refused(&f, t, "ca_basic_constraints");
}

#[test]
fn root_whose_subject_is_not_its_issuer() {
    let f = fixture();
    let mut t = intermediate(&f);
    t.kind = CertKind::Root;
    replace(
        &mut t,
        ext(
            &BasicConstraints {
                ca: true,
                path_len_constraint: None,
            },
            true,
        ),
    );
    assert_refused(&f, t, "root_self_issued");
}

#[test]
fn server_certificate_without_server_auth() {
    let f = fixture();
    let mut t = leaf(&f);
    t.kind = CertKind::Server;
    t.extensions =
        crate::issuance::server_extensions(&f.issuer.ski, &["localhost".into()], &[]).unwrap();
    replace(
        &mut t,
        ext(
            &x509_cert::ext::pkix::ExtendedKeyUsage(vec![crate::issuance::OID_CLIENT_AUTH]),
            false,
        ),
    );
    assert_refused(&f, t, "server_extended_key_usage");
}

#[test]
fn tbs_key_that_is_not_the_validated_key() {
    let f = fixture();
    let mut prepared = prepare(leaf(&f), &f.issuer).unwrap();
    prepared.subject_key = SoftwareSigner::new().public_key().clone();
    let err = lint(prepared).err().expect("lint subject_key did not fire");
    assert!(
        err.findings.iter().any(|x| x.starts_with("subject_key:")),
        "{:?}",
        err.findings
    );
}
