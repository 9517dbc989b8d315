//! The CA hierarchy: making roots, intermediates and CSRs with a token key, checking chains,
//! and the files of Istio's plugged-in CA layout (`root-cert.pem`, `ca-cert.pem`,
//! `cert-chain.pem`; never a `ca-key.pem`: the key stays in the token).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use der::asn1::BitString;
use der::pem::LineEnding;
use der::{Encode, EncodePem};
use hsmca_hsm::{PublicKey, Signer};
use x509_cert::Certificate;
use x509_cert::ext::pkix::SubjectKeyIdentifier;
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, Version as CsrVersion};

use crate::files::{Overwrite, write_atomic};
use crate::issuance::{
    self, CertKind, CertTemplate, IssueError, IssuerInfo, intermediate_extensions, key_identifier,
    root_extensions,
};

/// Clock skew allowance applied to every notBefore (as istiod does).
pub const CLOCK_SKEW: Duration = Duration::from_secs(120);

/// Errors of the CA hierarchy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// Issuing a CA certificate failed.
    #[error(transparent)]
    Issue(#[from] IssueError),
    /// A certificate or CSR is malformed.
    #[error("{0}")]
    Malformed(String),
    /// A chain does not verify.
    #[error("chain does not verify: {0}")]
    Chain(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The subject key identifier of a certificate (from its SKI extension, else computed).
pub fn subject_key_id(cert: &Certificate) -> Vec<u8> {
    if let Ok(Some((_, ski))) = cert
        .tbs_certificate()
        .get_extension::<SubjectKeyIdentifier>()
    {
        return ski.0.as_bytes().to_vec();
    }
    key_identifier(
        cert.tbs_certificate()
            .subject_public_key_info()
            .subject_public_key
            .raw_bytes(),
    )
}

/// The public key a certificate certifies.
pub fn cert_public_key(cert: &Certificate) -> Result<PublicKey, CaError> {
    let der = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|e| CaError::Malformed(e.to_string()))?;
    PublicKey::from_spki_der(&der).map_err(|e| CaError::Malformed(e.to_string()))
}

/// What the issuing certificate of `cert` needs for [`issuance::prepare`].
pub fn issuer_info(issuer: &Certificate) -> Result<IssuerInfo, CaError> {
    let public_key = cert_public_key(issuer)?;
    let algorithm = public_key.algorithm().ok_or_else(|| {
        CaError::Malformed(format!(
            "issuer key {} is not a CA key",
            public_key.type_name()
        ))
    })?;
    Ok(IssuerInfo {
        name: issuer.tbs_certificate().subject().clone(),
        ski: subject_key_id(issuer),
        not_after: Some(
            issuer
                .tbs_certificate()
                .validity()
                .not_after
                .to_system_time(),
        ),
        public_key,
        algorithm,
    })
}

/// Makes a self-signed root for the token key behind `signer`.
pub fn make_root(
    signer: &dyn Signer,
    subject: Name,
    lifetime: Duration,
) -> Result<Certificate, CaError> {
    let public_key = signer.public_key().clone();
    let ski = key_identifier(&public_key.subject_public_key_bytes());
    let now = SystemTime::now();
    let issuer = IssuerInfo {
        name: subject.clone(),
        ski: ski.clone(),
        not_after: None,
        public_key: public_key.clone(),
        algorithm: signer.algorithm(),
    };
    let template = CertTemplate {
        kind: CertKind::Root,
        serial: issuance::random_serial(),
        subject,
        not_before: now - CLOCK_SKEW,
        not_after: now + lifetime,
        public_key,
        extensions: root_extensions(&ski),
    };
    let linted = issuance::lint(issuance::prepare(template, &issuer)?).map_err(IssueError::from)?;
    Ok(issuance::issue(linted, signer)?)
}

/// Makes an intermediate (pathLen 0) for `subject_key`, signed by the issuer key behind
/// `issuer_signer` whose certificate is `issuer_cert`. The lifetime is cut to the issuer's.
pub fn make_intermediate(
    issuer_signer: &dyn Signer,
    issuer_cert: &Certificate,
    subject_key: PublicKey,
    subject: Name,
    lifetime: Duration,
) -> Result<Certificate, CaError> {
    let issuer = issuer_info(issuer_cert)?;
    let now = SystemTime::now();
    let not_after = (now + lifetime).min(issuer.not_after.unwrap_or(now + lifetime));
    let ski = key_identifier(&subject_key.subject_public_key_bytes());
    let template = CertTemplate {
        kind: CertKind::Intermediate,
        serial: issuance::random_serial(),
        subject,
        not_before: now - CLOCK_SKEW,
        not_after,
        public_key: subject_key,
        extensions: intermediate_extensions(&ski, &issuer.ski),
    };
    let linted = issuance::lint(issuance::prepare(template, &issuer)?).map_err(IssueError::from)?;
    Ok(issuance::issue(linted, issuer_signer)?)
}

/// Makes a PKCS#10 CSR for the token key behind `signer`, signed by that key.
pub fn make_csr(signer: &dyn Signer, subject: Name) -> Result<CertReq, CaError> {
    let info = CertReqInfo {
        version: CsrVersion::V1,
        subject,
        public_key: signer.public_key().spki(),
        attributes: Default::default(),
    };
    let info_der = info
        .to_der()
        .map_err(|e| CaError::Malformed(e.to_string()))?;
    let signature = signer.sign(&info_der).map_err(IssueError::from)?;
    Ok(CertReq {
        info,
        algorithm: signer.algorithm().signature_algorithm(),
        signature: BitString::from_bytes(&signature)
            .map_err(|e| CaError::Malformed(e.to_string()))?,
    })
}

/// Checks that `cert` was signed by the key of `issuer` and names it as issuer.
pub fn verify_issued_by(cert: &Certificate, issuer: &Certificate) -> Result<(), CaError> {
    if cert.tbs_certificate().issuer() != issuer.tbs_certificate().subject() {
        return Err(CaError::Chain(format!(
            "issuer of {} is not {}",
            cert.tbs_certificate().subject(),
            issuer.tbs_certificate().subject()
        )));
    }
    let tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| CaError::Malformed(e.to_string()))?;
    cert_public_key(issuer)?
        .verify(
            cert.signature_algorithm().oid,
            &tbs,
            cert.signature().raw_bytes(),
        )
        .map_err(|e| {
            CaError::Chain(format!(
                "signature of {} under {}: {e}",
                cert.tbs_certificate().subject(),
                issuer.tbs_certificate().subject()
            ))
        })
}

/// Verifies `chain` (leaf or CA first, root last): each certificate is signed by the next,
/// every one is within its validity at `now`, and the last is a self-signed root.
pub fn verify_chain(chain: &[Certificate], now: SystemTime) -> Result<(), CaError> {
    let root = chain
        .last()
        .ok_or_else(|| CaError::Chain("empty chain".into()))?;
    for pair in chain.windows(2) {
        verify_issued_by(&pair[0], &pair[1])?;
    }
    verify_issued_by(root, root).map_err(|e| {
        CaError::Chain(format!(
            "the last certificate is not a self-signed root: {e}"
        ))
    })?;
    for cert in chain {
        let v = cert.tbs_certificate().validity();
        if now < v.not_before.to_system_time() || now > v.not_after.to_system_time() {
            return Err(CaError::Chain(format!(
                "{} is not valid now (valid {} to {})",
                cert.tbs_certificate().subject(),
                v.not_before,
                v.not_after
            )));
        }
    }
    Ok(())
}

/// PEM of one certificate.
pub fn to_pem(cert: &Certificate) -> String {
    cert.to_pem(LineEnding::LF).expect("a certificate encodes")
}

/// Reads every certificate from a PEM file.
pub fn read_pem_certs(path: &Path) -> Result<Vec<Certificate>, CaError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let certs = Certificate::load_pem_chain(&bytes).map_err(|e| {
        CaError::Malformed(format!("{}: not PEM certificates: {e}", path.display()))
    })?;
    if certs.is_empty() {
        return Err(CaError::Malformed(format!(
            "{}: no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The files of a CA in Istio's plugged-in layout.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// The signing (intermediate) certificate.
    pub ca_cert: Certificate,
    /// The chain from the signing certificate's issuer up to and including the root.
    pub chain_above: Vec<Certificate>,
}

impl CaFiles {
    /// File names in the plugged-in layout.
    pub const ROOT: &'static str = "root-cert.pem";
    /// The signing certificate.
    pub const CA: &'static str = "ca-cert.pem";
    /// Signing certificate then its issuers up to the root.
    pub const CHAIN: &'static str = "cert-chain.pem";

    /// The root certificate.
    pub fn root(&self) -> &Certificate {
        self.chain_above.last().unwrap_or(&self.ca_cert)
    }

    /// `[ca_cert, intermediates..., root]`.
    pub fn full_chain(&self) -> Vec<Certificate> {
        std::iter::once(self.ca_cert.clone())
            .chain(self.chain_above.iter().cloned())
            .collect()
    }

    /// Writes the three files into `dir`, refusing to overwrite any: when one of them exists,
    /// nothing is written, and a failure part-way removes the files this call wrote.
    /// `cert-chain.pem` is written last, so its presence means the set is complete.
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        for name in [Self::ROOT, Self::CA, Self::CHAIN] {
            let path = dir.join(name);
            if path.exists() {
                return Err(CaError::Io {
                    source: std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!(
                            "{} already exists; refusing to overwrite it",
                            path.display()
                        ),
                    ),
                    path,
                });
            }
        }
        let chain_pem: String = self.full_chain().iter().map(to_pem).collect();
        let mut written = Vec::new();
        for (name, pem) in [
            (Self::ROOT, to_pem(self.root())),
            (Self::CA, to_pem(&self.ca_cert)),
            (Self::CHAIN, chain_pem),
        ] {
            let path = dir.join(name);
            if let Err(e) = write_atomic(&path, pem.as_bytes(), 0o644, Overwrite::Never) {
                for done in &written {
                    let _ = std::fs::remove_file(done);
                }
                return Err(io_err(&path)(e));
            }
            written.push(path);
        }
        Ok(())
    }

    /// Reads the three files from `dir` and checks that they agree and verify.
    pub fn load(dir: &Path) -> Result<CaFiles, CaError> {
        let root = read_pem_certs(&dir.join(Self::ROOT))?;
        let ca = read_pem_certs(&dir.join(Self::CA))?;
        let chain = read_pem_certs(&dir.join(Self::CHAIN))?;
        if chain[0] != ca[0] {
            return Err(CaError::Chain(format!(
                "{} does not start with the certificate in {}",
                Self::CHAIN,
                Self::CA
            )));
        }
        if chain.last() != root.first() {
            return Err(CaError::Chain(format!(
                "{} does not end with the root in {}",
                Self::CHAIN,
                Self::ROOT
            )));
        }
        verify_chain(&chain, SystemTime::now())?;
        Ok(CaFiles {
            ca_cert: chain[0].clone(),
            chain_above: chain[1..].to_vec(),
        })
    }
}
