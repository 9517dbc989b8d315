//! What goes into each kind of certificate: root, intermediate, workload leaf.

use der::Encode;
use der::asn1::{Ia5String, ObjectIdentifier, OctetString};
use sha1::Digest;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectAltName, SubjectKeyIdentifier,
};

/// EKU id-kp-serverAuth.
pub const OID_SERVER_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.1");
/// EKU id-kp-clientAuth.
pub const OID_CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");

/// The kind of certificate, which fixes its profile and the lints it must pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// A self-signed root CA.
    Root,
    /// An intermediate CA that issues only leaves (pathLen 0).
    Intermediate,
    /// A workload certificate (one SPIFFE ID).
    Leaf,
    /// The CA server's own TLS certificate (DNS and IP names, serverAuth only).
    Server,
}

/// The RFC 5280 method-1 key identifier: SHA-1 of the subjectPublicKey bits.
pub fn key_identifier(subject_public_key: &[u8]) -> Vec<u8> {
    sha1::Sha1::digest(subject_public_key).to_vec()
}

fn ext<T: Encode + der::oid::AssociatedOid>(value: &T, critical: bool) -> Extension {
    Extension {
        extn_id: T::OID,
        critical,
        extn_value: OctetString::new(value.to_der().expect("extension encodes"))
            .expect("extension fits"),
    }
}

fn ski(ski: &[u8]) -> Extension {
    ext(
        &SubjectKeyIdentifier(OctetString::new(ski).expect("ski fits")),
        false,
    )
}

fn aki(issuer_ski: &[u8]) -> Extension {
    ext(
        &AuthorityKeyIdentifier {
            key_identifier: Some(OctetString::new(issuer_ski).expect("aki fits")),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        },
        false,
    )
}

fn ca_key_usage() -> Extension {
    ext(&KeyUsage(KeyUsages::KeyCertSign | KeyUsages::CRLSign), true)
}

/// Root: CA:true (critical), keyUsage keyCertSign+cRLSign (critical), SKI.
pub fn root_extensions(subject_ski: &[u8]) -> Vec<Extension> {
    vec![
        ext(
            &BasicConstraints {
                ca: true,
                path_len_constraint: None,
            },
            true,
        ),
        ca_key_usage(),
        ski(subject_ski),
    ]
}

/// Intermediate: CA:true pathLen 0 (critical), CA key usage (critical), SKI and AKI.
pub fn intermediate_extensions(subject_ski: &[u8], issuer_ski: &[u8]) -> Vec<Extension> {
    vec![
        ext(
            &BasicConstraints {
                ca: true,
                path_len_constraint: Some(0),
            },
            true,
        ),
        ca_key_usage(),
        ski(subject_ski),
        aki(issuer_ski),
    ]
}

/// The server's own TLS certificate: CA:false, digitalSignature, EKU serverAuth, AKI, and a
/// non-critical SAN with the DNS names and IP addresses it answers to.
pub fn server_extensions(
    issuer_ski: &[u8],
    dns: &[String],
    ips: &[std::net::IpAddr],
) -> Result<Vec<Extension>, der::Error> {
    let mut names = Vec::with_capacity(dns.len() + ips.len());
    for name in dns {
        names.push(GeneralName::DnsName(Ia5String::new(name)?));
    }
    for ip in ips {
        let bytes = match ip {
            std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
            std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        names.push(GeneralName::IpAddress(OctetString::new(bytes)?));
    }
    Ok(vec![
        ext(
            &BasicConstraints {
                ca: false,
                path_len_constraint: None,
            },
            true,
        ),
        ext(&KeyUsage(KeyUsages::DigitalSignature.into()), true),
        ext(&ExtendedKeyUsage(vec![OID_SERVER_AUTH]), false),
        aki(issuer_ski),
        ext(&SubjectAltName(names), false),
    ])
}

/// A workload leaf: CA:false (critical), digitalSignature (+keyEncipherment for RSA keys only,
/// RFC 8813), EKU serverAuth+clientAuth, AKI, and the SAN (critical when the subject is empty).
pub fn leaf_extensions(
    rsa_key: bool,
    issuer_ski: &[u8],
    uris: &[String],
    dns: &[String],
    subject_empty: bool,
) -> Result<Vec<Extension>, der::Error> {
    let usages = if rsa_key {
        KeyUsages::DigitalSignature | KeyUsages::KeyEncipherment
    } else {
        KeyUsages::DigitalSignature.into()
    };
    let mut names = Vec::with_capacity(uris.len() + dns.len());
    for uri in uris {
        names.push(GeneralName::UniformResourceIdentifier(Ia5String::new(uri)?));
    }
    for name in dns {
        names.push(GeneralName::DnsName(Ia5String::new(name)?));
    }
    let mut exts = vec![
        ext(
            &BasicConstraints {
                ca: false,
                path_len_constraint: None,
            },
            true,
        ),
        ext(&KeyUsage(usages), true),
        ext(
            &ExtendedKeyUsage(vec![OID_SERVER_AUTH, OID_CLIENT_AUTH]),
            false,
        ),
        aki(issuer_ski),
    ];
    if !names.is_empty() {
        exts.push(ext(&SubjectAltName(names), subject_empty));
    }
    Ok(exts)
}
