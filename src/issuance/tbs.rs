//! Building the TBS certificate with x509-cert, and turning a linted TBS into a certificate.

use std::time::SystemTime;

use der::asn1::BitString;
use der::{Decode, Encode};
use hsmca_hsm::{KeyAlgorithm, PublicKey, Signer};
use spki::{AlgorithmIdentifierOwned, DynSignatureAlgorithmIdentifier, EncodePublicKey};
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::certificate::{Certificate, TbsCertificate};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

use super::lint::LintedTbs;
use super::profile::CertKind;

/// Everything the certificate will say, decided before anything is encoded.
#[derive(Debug, Clone)]
pub struct CertTemplate {
    /// The profile the certificate follows (and the lints it must pass).
    pub kind: CertKind,
    /// Serial number: random, positive, at least 64 bits of entropy.
    pub serial: SerialNumber,
    /// Subject name (may be empty for a workload leaf).
    pub subject: Name,
    /// notBefore.
    pub not_before: SystemTime,
    /// notAfter.
    pub not_after: SystemTime,
    /// The certified public key.
    pub public_key: PublicKey,
    /// Extensions, in order.
    pub extensions: Vec<Extension>,
}

/// What the TBS needs to know of its issuer.
#[derive(Debug, Clone)]
pub struct IssuerInfo {
    /// The issuer's subject name (for a root, its own).
    pub name: Name,
    /// The issuer's subject key identifier.
    pub ski: Vec<u8>,
    /// The issuer's notAfter; `None` for a self-signed root.
    pub not_after: Option<SystemTime>,
    /// The issuing key's algorithm and public key.
    pub public_key: PublicKey,
    /// The key algorithm of the issuing key.
    pub algorithm: KeyAlgorithm,
}

/// A random positive serial number with 136 bits of entropy.
pub fn random_serial() -> SerialNumber {
    SerialNumber::generate(&mut rand::rng())
}

/// Why a certificate could not be issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The template could not be encoded.
    #[error("cannot encode the certificate: {0}")]
    Encode(String),
    /// The linter refused the TBS (our bug: never silently fixed).
    #[error(transparent)]
    Lint(#[from] super::LintError),
    /// The signer failed.
    #[error("signing failed: {0}")]
    Sign(#[from] hsmca_hsm::Error),
    /// The assembled certificate is not what was linted, or does not verify.
    #[error("signed certificate failed its post-signing check: {0}")]
    PostCheck(String),
}

/// The issuer's public key and algorithm, in the shape x509-cert's builder asks of a signer.
/// It never signs: the signature comes from the token between `finalize` and `assemble`.
#[derive(Clone)]
pub(super) struct IssuerKey {
    spki_der: Vec<u8>,
    algorithm: AlgorithmIdentifierOwned,
}

impl signature::Keypair for IssuerKey {
    type VerifyingKey = IssuerKey;
    fn verifying_key(&self) -> IssuerKey {
        self.clone()
    }
}

impl EncodePublicKey for IssuerKey {
    fn to_public_key_der(&self) -> spki::Result<der::Document> {
        Ok(der::Document::try_from(self.spki_der.as_slice())?)
    }
}

impl DynSignatureAlgorithmIdentifier for IssuerKey {
    fn signature_algorithm_identifier(&self) -> spki::Result<AlgorithmIdentifierOwned> {
        Ok(self.algorithm.clone())
    }
}

/// A builder profile that writes exactly what the template decided.
pub(super) struct Decided {
    issuer: Name,
    subject: Name,
    extensions: Vec<Extension>,
}

impl BuilderProfile for Decided {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
    }
    fn get_subject(&self) -> Name {
        self.subject.clone()
    }
    fn build_extensions(
        &self,
        _spk: spki::SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: spki::SubjectPublicKeyInfoRef<'_>,
        _tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        Ok(self.extensions.clone())
    }
}

/// A TBS certificate encoded but not yet linted.
pub struct PreparedTbs {
    pub(super) kind: CertKind,
    pub(super) builder: CertificateBuilder<Decided>,
    pub(super) issuer_key: IssuerKey,
    pub(super) issuer: IssuerInfo,
    pub(super) tbs_der: Vec<u8>,
    pub(super) tbs: TbsCertificate,
    /// The validated key the certificate is for.
    pub(super) subject_key: PublicKey,
}

impl PreparedTbs {
    /// The DER TBS certificate that will be linted and signed.
    pub fn tbs_der(&self) -> &[u8] {
        &self.tbs_der
    }
}

/// Encodes the template as a TBS certificate for `issuer`.
pub fn prepare(template: CertTemplate, issuer: &IssuerInfo) -> Result<PreparedTbs, IssueError> {
    let enc = |e: &dyn std::fmt::Display| IssueError::Encode(e.to_string());
    let validity = Validity::new(
        Time::try_from(template.not_before).map_err(|e| enc(&e))?,
        Time::try_from(template.not_after).map_err(|e| enc(&e))?,
    );
    let spki = template.public_key.spki();
    let profile = Decided {
        issuer: issuer.name.clone(),
        subject: template.subject,
        extensions: template.extensions,
    };
    let issuer_key = IssuerKey {
        spki_der: issuer.public_key.spki_der().to_vec(),
        algorithm: issuer.algorithm.signature_algorithm(),
    };
    let mut builder =
        CertificateBuilder::new(profile, template.serial, validity, spki).map_err(|e| enc(&e))?;
    let tbs_der = builder.finalize(&issuer_key).map_err(|e| enc(&e))?;
    let tbs = TbsCertificate::from_der(&tbs_der).map_err(|e| enc(&e))?;
    Ok(PreparedTbs {
        kind: template.kind,
        builder,
        issuer_key,
        issuer: issuer.clone(),
        tbs_der,
        tbs,
        subject_key: template.public_key,
    })
}

/// Signs a linted TBS with `signer` and assembles the certificate. The signer must hold the
/// issuer's key. Afterwards the certificate's TBS must be byte-identical to the linted one and
/// its signature must verify under the issuer's public key.
pub fn issue(linted: LintedTbs, signer: &dyn Signer) -> Result<Certificate, IssueError> {
    let prepared = linted.into_prepared();
    if signer.public_key() != &prepared.issuer.public_key {
        return Err(IssueError::PostCheck(
            "the signer's key is not the issuer's key".into(),
        ));
    }
    let signature = signer.sign(&prepared.tbs_der)?;
    let bits = BitString::from_bytes(&signature).map_err(|e| IssueError::Encode(e.to_string()))?;
    let linted_der = prepared.tbs_der;
    let cert = prepared
        .builder
        .assemble(bits, &prepared.issuer_key)
        .map_err(|e| IssueError::Encode(e.to_string()))?;
    let signed_tbs = cert
        .tbs_certificate()
        .to_der()
        .map_err(|e| IssueError::Encode(e.to_string()))?;
    if signed_tbs != linted_der {
        return Err(IssueError::PostCheck(
            "the signed TBS differs from the linted TBS".into(),
        ));
    }
    // The signature must verify under the issuer key over exactly these bytes. A signer that
    // already checked it (the HSM signer checks every signature the token returns) is not
    // checked twice: the bytes it verified are the bytes now in the certificate.
    if !signer.verifies_signatures() || cert.signature().raw_bytes() != signature.as_slice() {
        prepared
            .issuer
            .public_key
            .verify(
                cert.signature_algorithm().oid,
                &signed_tbs,
                cert.signature().raw_bytes(),
            )
            .map_err(|e| IssueError::PostCheck(e.to_string()))?;
    }
    Ok(cert)
}
