//! Workload certificates: check the CSR, decide the certificate (SANs from the authenticated
//! identity only, lifetime capped), lint it, sign it in the token, verify it.

use std::sync::Arc;
use std::time::SystemTime;

use der::{Decode, Encode};
use hsmca_hsm::{PublicKey, Signer};
use x509_cert::Certificate;
use x509_cert::name::Name;
use x509_cert::request::CertReq;

use super::{CertKind, CertTemplate, IssueError, IssuerInfo, LintError};
use crate::ca::{self, CLOCK_SKEW, CaFiles};

/// The largest CSR accepted, in bytes of PEM.
pub const MAX_CSR_BYTES: usize = 64 * 1024;

/// What the workload CA needs to know beyond its key and files.
#[derive(Debug, Clone)]
pub struct WorkloadSettings {
    /// Trust domain of the SPIFFE IDs.
    pub trust_domain: String,
}

/// Why a workload certificate was not issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// The CSR is malformed, or its signature or key is unacceptable.
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    /// The identity cannot be put in a certificate.
    #[error("{0}")]
    BadIdentity(String),
    /// The linter refused the TBS: our bug, never silently fixed.
    #[error(transparent)]
    Lint(#[from] LintError),
    /// The token could not sign.
    #[error("HSM: {0}")]
    Hsm(hsmca_hsm::Error),
    /// Anything else that went wrong building or checking the certificate.
    #[error("{0}")]
    Internal(String),
}

impl From<IssueError> for WorkloadError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::Lint(l) => WorkloadError::Lint(l),
            IssueError::Sign(h) => WorkloadError::Hsm(h),
            other => WorkloadError::Internal(other.to_string()),
        }
    }
}

/// A CSR whose signature verified.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    /// The key to certify.
    pub public_key: PublicKey,
    /// Its type for policy (`ecdsa-p256`, `rsa-2048`, ...).
    pub key_type: String,
    /// URI SANs the CSR asks for (never trusted; policy decides).
    pub uri_sans: Vec<String>,
    /// DNS SANs the CSR asks for (never trusted; policy decides).
    pub dns_sans: Vec<String>,
    /// The CSR subject had a non-empty CommonName.
    pub has_common_name: bool,
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf.
    pub certificate: Certificate,
    /// The leaf's DER.
    pub der: Vec<u8>,
    /// `[leaf, intermediates..., root]`, one PEM certificate per string.
    pub chain: Vec<String>,
    /// Serial, hex.
    pub serial: String,
    /// notAfter.
    pub not_after: SystemTime,
}

/// The signing CA for workloads: the token key, its certificate chain, and the limits.
pub struct WorkloadCa {
    signer: Arc<dyn Signer>,
    issuer: IssuerInfo,
    chain_pems: Vec<String>,
    files: CaFiles,
    settings: WorkloadSettings,
}

impl WorkloadCa {
    /// A CA signing with `signer`, whose certificate and chain are `files`. Refuses a signer
    /// whose key is not the key of `files.ca_cert`.
    pub fn new(
        signer: Arc<dyn Signer>,
        files: CaFiles,
        settings: WorkloadSettings,
    ) -> Result<Self, WorkloadError> {
        let issuer =
            ca::issuer_info(&files.ca_cert).map_err(|e| WorkloadError::Internal(e.to_string()))?;
        if signer.public_key() != &issuer.public_key {
            return Err(WorkloadError::Internal(
                "the token key is not the key certified by ca-cert.pem".into(),
            ));
        }
        let chain_pems = files.full_chain().iter().map(ca::to_pem).collect();
        Ok(WorkloadCa {
            signer,
            issuer,
            chain_pems,
            files,
            settings,
        })
    }

    /// The CA files.
    pub fn files(&self) -> &CaFiles {
        &self.files
    }

    /// The signer.
    pub fn signer(&self) -> &Arc<dyn Signer> {
        &self.signer
    }

    /// What the issuer looks like to a TBS.
    pub fn issuer(&self) -> &IssuerInfo {
        &self.issuer
    }

    /// The settings.
    pub fn settings(&self) -> &WorkloadSettings {
        &self.settings
    }

    /// Builds and lints the leaf the policy approved. Nothing is signed here.
    pub fn prepare(
        &self,
        csr: &CheckedCsr,
        allowed: &hsmca_policy::Allowed,
    ) -> Result<super::LintedTbs, WorkloadError> {
        let subject = match &allowed.common_name {
            Some(cn) => {
                use std::str::FromStr;
                // SPIFFE IDs hold no RFC 4514 special characters.
                Name::from_str(&format!("CN={cn}"))
                    .map_err(|e| WorkloadError::Internal(e.to_string()))?
            }
            None => Name::default(),
        };
        let subject_empty = subject.is_empty();
        let not_after = allowed
            .not_after
            .min(self.issuer.not_after.unwrap_or(allowed.not_after));
        let extensions = super::leaf_extensions(
            csr.public_key.is_rsa(),
            &self.issuer.ski,
            &allowed.uri_sans,
            &allowed.dns_sans,
            subject_empty,
        )
        .map_err(|e| WorkloadError::BadIdentity(format!("identity cannot be encoded: {e}")))?;
        let template = CertTemplate {
            kind: CertKind::Leaf,
            serial: super::random_serial(),
            subject,
            not_before: allowed.not_before - CLOCK_SKEW,
            not_after,
            public_key: csr.public_key.clone(),
            extensions,
        };
        Ok(super::lint(super::prepare(template, &self.issuer)?)?)
    }

    /// Signs a linted leaf in the token (blocking) and assembles the response chain.
    pub fn sign(&self, linted: super::LintedTbs) -> Result<Issued, WorkloadError> {
        let certificate = super::issue(linted, self.signer.as_ref())?;
        let tbs = certificate.tbs_certificate();
        let serial = super::serial_hex(tbs.serial_number());
        let not_after = tbs.validity().not_after.to_system_time();
        let der = certificate
            .to_der()
            .map_err(|e| WorkloadError::Internal(e.to_string()))?;
        let mut chain = Vec::with_capacity(self.chain_pems.len() + 1);
        chain.push(
            der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &der)
                .map_err(|e| WorkloadError::Internal(e.to_string()))?,
        );
        chain.extend(self.chain_pems.iter().cloned());
        Ok(Issued {
            certificate,
            der,
            chain,
            serial,
            not_after,
        })
    }
}

/// Parses a PEM CSR, bounded in size, and verifies its self-signature and key.
pub fn check_csr(pem: &str) -> Result<CheckedCsr, WorkloadError> {
    let bad = |m: String| WorkloadError::BadCsr(m);
    if pem.trim().is_empty() {
        return Err(bad("empty CSR".into()));
    }
    if pem.len() > MAX_CSR_BYTES {
        return Err(bad(format!("{} bytes, at most {MAX_CSR_BYTES}", pem.len())));
    }
    let (label, der_bytes) = der::pem::decode_vec(pem.trim().as_bytes())
        .map_err(|e| bad(format!("not a PEM-encoded PKCS#10 request: {e}")))?;
    if label != "CERTIFICATE REQUEST" && label != "NEW CERTIFICATE REQUEST" {
        return Err(bad(format!(
            "PEM label {label:?} is not CERTIFICATE REQUEST"
        )));
    }
    // Strict DER: `from_der` refuses trailing bytes, and the signature is checked over the
    // request info exactly as received, which must be what was parsed.
    let req = CertReq::from_der(&der_bytes)
        .map_err(|e| bad(format!("not a DER PKCS#10 request: {e}")))?;
    let info = signed_info(&der_bytes).ok_or_else(|| bad("malformed request structure".into()))?;
    if req.info.to_der().map_err(|e| bad(e.to_string()))? != info {
        return Err(bad("the request info is not in canonical DER".into()));
    }
    let key_der = req
        .info
        .public_key
        .to_der()
        .map_err(|e| bad(e.to_string()))?;
    let public_key = PublicKey::from_spki_der(&key_der).map_err(|e| bad(e.to_string()))?;
    let sig = req
        .signature
        .as_bytes()
        .ok_or_else(|| bad("signature bit string has unused bits".into()))?;
    public_key
        .verify(req.algorithm.oid, &info, sig)
        .map_err(|e| bad(format!("CSR signature: {e}")))?;
    let has_common_name = req
        .info
        .subject
        .common_name()
        .ok()
        .flatten()
        .is_some_and(|cn| !cn.value().is_empty());
    let (uri_sans, dns_sans) = requested_sans(&req);
    Ok(CheckedCsr {
        key_type: public_key.type_name(),
        public_key,
        uri_sans,
        dns_sans,
        has_common_name,
    })
}

/// The bytes of the CertificationRequestInfo (the first element of the outer SEQUENCE), as
/// received.
fn signed_info(der_bytes: &[u8]) -> Option<Vec<u8>> {
    use der::{Decode, Header, Reader, SliceReader};
    let mut reader = SliceReader::new(der_bytes).ok()?;
    Header::decode(&mut reader).ok()?;
    let start: usize = u32::from(reader.position()) as usize;
    let header = Header::decode(&mut reader).ok()?;
    let end = u32::from(reader.position()) as usize + u32::from(header.length()) as usize;
    der_bytes.get(start..end).map(<[u8]>::to_vec)
}

/// The SANs a CSR asks for in its extensionRequest attribute.
fn requested_sans(req: &CertReq) -> (Vec<String>, Vec<String>) {
    use der::oid::AssociatedOid;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::request::ExtensionReq;
    let (mut uris, mut dns) = (Vec::new(), Vec::new());
    for attr in req
        .info
        .attributes
        .iter()
        .filter(|a| a.oid == ExtensionReq::OID)
    {
        for value in attr.values.iter() {
            let Ok(exts) = value.decode_as::<ExtensionReq>() else {
                continue;
            };
            for ext in exts.0.iter().filter(|e| e.extn_id == SubjectAltName::OID) {
                let Ok(san) = <SubjectAltName as der::Decode>::from_der(ext.extn_value.as_bytes())
                else {
                    continue;
                };
                for name in san.0 {
                    match name {
                        GeneralName::UniformResourceIdentifier(u) => uris.push(u.to_string()),
                        GeneralName::DnsName(d) => dns.push(d.to_string()),
                        _ => {}
                    }
                }
            }
        }
    }
    (uris, dns)
}
