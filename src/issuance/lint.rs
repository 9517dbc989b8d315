//! The lint gate: the exact TBS bytes that will be signed are checked against RFC 5280 and the
//! SPIFFE X.509-SVID rules for their profile. Only this module creates a [`LintedTbs`], and
//! [`super::issue`] accepts nothing else, so an unlinted TBS cannot reach the signer.

use std::collections::HashSet;
use std::time::Duration;

use der::Decode;
use der::asn1::ObjectIdentifier;
use hsmca_policy::SpiffeId;
use x509_cert::certificate::Version;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};
use x509_cert::time::Time;

use super::profile::CertKind;
use super::tbs::PreparedTbs;

/// A TBS certificate that passed every lint of its profile. Not `Clone`; consumed by
/// [`super::issue`].
pub struct LintedTbs {
    prepared: PreparedTbs,
}

impl LintedTbs {
    /// The linted DER bytes (exactly what will be signed).
    pub fn tbs_der(&self) -> &[u8] {
        &self.prepared.tbs_der
    }

    /// The serial number, hex.
    pub fn serial_hex(&self) -> String {
        super::serial_hex(self.prepared.tbs.serial_number())
    }

    /// notBefore and notAfter.
    pub fn validity(&self) -> (std::time::SystemTime, std::time::SystemTime) {
        let v = self.prepared.tbs.validity();
        (v.not_before.to_system_time(), v.not_after.to_system_time())
    }

    pub(super) fn into_prepared(self) -> PreparedTbs {
        self.prepared
    }
}

/// The lints a TBS failed. Never silently fixed: the request fails and the findings are
/// reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate lint failed: {}", .findings.join("; "))]
pub struct LintError {
    /// One line per failed lint, each starting with the lint's name.
    pub findings: Vec<String>,
}

/// 2050-01-01T00:00:00Z: RFC 5280 requires UTCTime before, GeneralizedTime from then on.
const Y2050: Duration = Duration::from_secs(2_524_608_000);

/// Lints the prepared TBS for its profile.
pub fn lint(prepared: PreparedTbs) -> Result<LintedTbs, LintError> {
    let findings = findings(&prepared);
    if findings.is_empty() {
        Ok(LintedTbs { prepared })
    } else {
        Err(LintError { findings })
    }
}

fn findings(p: &PreparedTbs) -> Vec<String> {
    let mut f = Vec::new();
    let tbs = &p.tbs;
    let mut fail = |name: &str, detail: String| f.push(format!("{name}: {detail}"));

    if tbs.version() != Version::V3 {
        fail("version", "must be v3".into());
    }

    // Serial: positive, at most 20 octets, at least 64 bits of randomness.
    let serial = tbs.serial_number().as_bytes();
    if serial.is_empty() || serial[0] & 0x80 != 0 || serial.iter().all(|b| *b == 0) {
        fail("serial_positive", "serial number must be positive".into());
    }
    if serial.len() > 20 {
        fail(
            "serial_length",
            format!("{} octets, at most 20", serial.len()),
        );
    }
    let significant = serial.iter().skip_while(|b| **b == 0).count();
    if significant < 8 {
        fail("serial_entropy", "fewer than 64 bits".into());
    }

    let issuer_alg = p
        .issuer
        .public_key
        .algorithm()
        .map(|a| a.signature_algorithm());
    if issuer_alg.as_ref() != Some(tbs.signature()) {
        fail(
            "signature_algorithm",
            "does not match the issuer key".into(),
        );
    }
    if tbs.issuer() != &p.issuer.name {
        fail("issuer_name", "does not equal the issuer's subject".into());
    }

    // Validity.
    let not_before = tbs.validity().not_before;
    let not_after = tbs.validity().not_after;
    for (name, t) in [("not_before", not_before), ("not_after", not_after)] {
        let utc_ok = t.to_unix_duration() < Y2050;
        match t {
            Time::UtcTime(_) if !utc_ok => {
                fail("time_encoding", format!("{name} after 2049 in UTCTime"))
            }
            Time::GeneralTime(_) if utc_ok => fail(
                "time_encoding",
                format!("{name} before 2050 in GeneralizedTime"),
            ),
            _ => {}
        }
    }
    if not_after.to_unix_duration() <= not_before.to_unix_duration() {
        fail("validity_order", "notAfter is not after notBefore".into());
    }
    if let Some(issuer_not_after) = p.issuer.not_after
        && not_after.to_system_time() > issuer_not_after
    {
        fail(
            "validity_within_issuer",
            "notAfter is past the issuer's notAfter".into(),
        );
    }

    // Extensions: no duplicates, and decoded for the profile checks.
    let exts = tbs.extensions().map(|e| e.as_slice()).unwrap_or_default();
    let mut seen = HashSet::new();
    for e in exts {
        if !seen.insert(e.extn_id) {
            fail("duplicate_extension", e.extn_id.to_string());
        }
    }
    let find = |oid: ObjectIdentifier| exts.iter().find(|e| e.extn_id == oid);
    let decode = |oid: ObjectIdentifier| find(oid).map(|e| (e.critical, e.extn_value.as_bytes()));

    let bc = decode(<BasicConstraints as der::oid::AssociatedOid>::OID)
        .and_then(|(c, v)| BasicConstraints::from_der(v).ok().map(|bc| (c, bc)));
    let ku = decode(<KeyUsage as der::oid::AssociatedOid>::OID)
        .and_then(|(c, v)| KeyUsage::from_der(v).ok().map(|ku| (c, ku)));
    let ski = decode(<SubjectKeyIdentifier as der::oid::AssociatedOid>::OID)
        .and_then(|(_, v)| SubjectKeyIdentifier::from_der(v).ok());
    let aki = decode(<AuthorityKeyIdentifier as der::oid::AssociatedOid>::OID)
        .and_then(|(_, v)| AuthorityKeyIdentifier::from_der(v).ok());
    let eku = decode(<ExtendedKeyUsage as der::oid::AssociatedOid>::OID)
        .and_then(|(_, v)| ExtendedKeyUsage::from_der(v).ok());
    let san = decode(<SubjectAltName as der::oid::AssociatedOid>::OID)
        .and_then(|(c, v)| SubjectAltName::from_der(v).ok().map(|san| (c, san)));

    // The certified key was validated when it was parsed (CSR check, token, software key); the
    // TBS must carry exactly that key, so it is compared, not parsed a second time.
    let spki = der::Encode::to_der(tbs.subject_public_key_info()).unwrap_or_default();
    let key = if spki == p.subject_key.spki_der() {
        Some(&p.subject_key)
    } else {
        fail("subject_key", "the TBS key is not the validated key".into());
        None
    };

    let aki_matches = aki
        .as_ref()
        .and_then(|a| a.key_identifier.as_ref())
        .is_some_and(|id| id.as_bytes() == p.issuer.ski.as_slice());

    match p.kind {
        CertKind::Root | CertKind::Intermediate => {
            match &bc {
                Some((true, bc)) if bc.ca => {
                    let want = (p.kind == CertKind::Intermediate).then_some(0);
                    if bc.path_len_constraint != want {
                        fail(
                            "ca_path_len",
                            format!("pathLen {:?}, want {want:?}", bc.path_len_constraint),
                        );
                    }
                }
                _ => fail(
                    "ca_basic_constraints",
                    "CA:true, critical, is required".into(),
                ),
            }
            match &ku {
                Some((true, ku)) if ku.0.contains(KeyUsages::KeyCertSign) => {}
                _ => fail(
                    "ca_key_usage",
                    "critical keyUsage with keyCertSign is required".into(),
                ),
            }
            if ski.is_none() {
                fail("ca_subject_key_identifier", "SKI is required".into());
            }
            if tbs.subject().is_empty() {
                fail("ca_subject", "a CA needs a subject name".into());
            }
            if key.as_ref().is_some_and(|k| k.algorithm().is_none()) {
                fail("ca_key_type", "not a CA key algorithm".into());
            }
            if p.kind == CertKind::Intermediate && !aki_matches {
                fail(
                    "authority_key_identifier",
                    "AKI must equal the issuer's SKI".into(),
                );
            }
            if p.kind == CertKind::Root && tbs.subject() != tbs.issuer() {
                fail(
                    "root_self_issued",
                    "a root's subject must equal its issuer".into(),
                );
            }
        }
        CertKind::Server => {
            if bc.as_ref().is_none_or(|(_, bc)| bc.ca) {
                fail(
                    "server_not_ca",
                    "basicConstraints CA:false is required".into(),
                );
            }
            if !aki_matches {
                fail(
                    "authority_key_identifier",
                    "AKI must equal the issuer's SKI".into(),
                );
            }
            match &eku {
                Some(eku) if eku.0.contains(&super::profile::OID_SERVER_AUTH) => {}
                _ => fail(
                    "server_extended_key_usage",
                    "EKU serverAuth is required".into(),
                ),
            }
            match &san {
                Some((_, san)) if !san.0.is_empty() => {}
                _ => fail("server_san", "a DNS or IP SAN is required".into()),
            }
        }
        CertKind::Leaf => {
            if let Some((_, bc)) = &bc {
                if bc.ca {
                    fail(
                        "leaf_not_ca",
                        "a workload certificate must have CA:false".into(),
                    );
                }
            } else {
                fail(
                    "leaf_basic_constraints",
                    "basicConstraints CA:false is required".into(),
                );
            }
            match &ku {
                Some((_, ku)) => {
                    if !ku.0.contains(KeyUsages::DigitalSignature) {
                        fail("leaf_key_usage", "digitalSignature is required".into());
                    }
                    if ku.0.contains(KeyUsages::KeyCertSign) || ku.0.contains(KeyUsages::CRLSign) {
                        fail("leaf_key_usage", "keyCertSign/cRLSign on a leaf".into());
                    }
                    if ku.0.contains(KeyUsages::KeyEncipherment)
                        && key.as_ref().is_some_and(|k| !k.is_rsa())
                    {
                        fail(
                            "leaf_key_usage",
                            "keyEncipherment on an EC key (RFC 8813)".into(),
                        );
                    }
                }
                None => fail("leaf_key_usage", "keyUsage is required".into()),
            }
            match &eku {
                Some(eku) if !eku.0.is_empty() => {}
                _ => fail("leaf_extended_key_usage", "EKU is required".into()),
            }
            if !aki_matches {
                fail(
                    "authority_key_identifier",
                    "AKI must equal the issuer's SKI".into(),
                );
            }
            match &san {
                None => fail("leaf_san", "subjectAltName is required".into()),
                Some((critical, san)) => {
                    if tbs.subject().is_empty() && !critical {
                        fail(
                            "san_critical",
                            "SAN must be critical when the subject is empty".into(),
                        );
                    }
                    let uris: Vec<&str> = san
                        .0
                        .iter()
                        .filter_map(|n| match n {
                            GeneralName::UniformResourceIdentifier(u) => Some(u.as_str()),
                            _ => None,
                        })
                        .collect();
                    if uris.len() != 1 {
                        fail(
                            "spiffe_one_uri",
                            format!("{} URI SANs, exactly one is required", uris.len()),
                        );
                    }
                    for uri in uris {
                        if let Err(e) = SpiffeId::parse(uri) {
                            fail("spiffe_id", e.to_string());
                        }
                    }
                    for n in &san.0 {
                        if let GeneralName::DnsName(d) = n
                            && d.as_str().contains('*')
                        {
                            fail("san_wildcard", format!("wildcard DNS name {}", d.as_str()));
                        }
                    }
                }
            }
        }
    }
    f
}

#[cfg(test)]
mod tests;
