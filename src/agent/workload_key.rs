//! The workload's private key and CSR, made in memory. The key's PEM lives in zeroizing memory
//! and is never written to disk unless the user asked for files.

use std::fmt;

use der::asn1::{Ia5String, OctetString, SetOfVec};
use der::{Encode, EncodePem};
use x509_cert::attr::Attribute;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, ExtensionReq, Version};
use zeroize::Zeroizing;

/// Which key the agent makes for the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKeyType {
    /// ECDSA P-256 (the default; what ztunnel uses).
    EcdsaP256,
    /// RSA 2048 (Istio's sidecar default).
    Rsa2048,
}

impl std::str::FromStr for WorkloadKeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "ecdsa" | "ec" | "p256" => Ok(WorkloadKeyType::EcdsaP256),
            "rsa-2048" | "rsa" | "" => Ok(WorkloadKeyType::Rsa2048),
            other => Err(format!(
                "unknown key type {other:?}: use ecdsa-p256 or rsa-2048"
            )),
        }
    }
}

/// A fresh key and the CSR for it.
pub struct WorkloadKey {
    /// The private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
    /// The CSR, PEM.
    pub csr_pem: String,
}

impl fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("key_pem", &"...")
            .finish()
    }
}

fn der_err(e: impl fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("building the CSR: {e}")
}

/// Makes a key and a CSR with an empty subject and a critical URI SAN `spiffe_id`, as Istio's
/// agent does.
pub fn generate(kind: WorkloadKeyType, spiffe_id: &str) -> anyhow::Result<WorkloadKey> {
    let san = SubjectAltName(vec![GeneralName::UniformResourceIdentifier(
        Ia5String::new(spiffe_id).map_err(der_err)?,
    )]);
    let ext = Extension {
        extn_id: <SubjectAltName as der::oid::AssociatedOid>::OID,
        critical: true,
        extn_value: OctetString::new(san.to_der().map_err(der_err)?).map_err(der_err)?,
    };
    let attr = Attribute::try_from(ExtensionReq(vec![ext])).map_err(der_err)?;
    let mut attributes = SetOfVec::new();
    attributes.insert(attr).map_err(der_err)?;
    let mut rng = rand::rng();
    let (key_pem, spki_der, alg): (Zeroizing<String>, Vec<u8>, hsmca_hsm::KeyAlgorithm) = match kind
    {
        WorkloadKeyType::EcdsaP256 => {
            use p256::pkcs8::{EncodePrivateKey, EncodePublicKey};
            let key =
                <p256::ecdsa::SigningKey as p256::elliptic_curve::Generate>::generate_from_rng(
                    &mut rng,
                );
            let pem = key
                .to_pkcs8_pem(der::pem::LineEnding::LF)
                .map_err(der_err)?;
            let spki = key.verifying_key().to_public_key_der().map_err(der_err)?;
            (
                Zeroizing::new(pem.to_string()),
                spki.as_bytes().to_vec(),
                hsmca_hsm::KeyAlgorithm::EcdsaP256,
            )
        }
        WorkloadKeyType::Rsa2048 => {
            use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
            let key = rsa::PrivateKey::new(&mut rng, 2048).map_err(der_err)?;
            let pem = key
                .to_pkcs8_pem(der::pem::LineEnding::LF)
                .map_err(der_err)?;
            let spki = key.to_public_key().to_public_key_der().map_err(der_err)?;
            (
                Zeroizing::new(pem.to_string()),
                spki.as_bytes().to_vec(),
                hsmca_hsm::KeyAlgorithm::Rsa2048,
            )
        }
    };
    let info = CertReqInfo {
        version: Version::V1,
        subject: Name::default(),
        public_key: <spki::SubjectPublicKeyInfoOwned as der::Decode>::from_der(&spki_der)
            .map_err(der_err)?,
        attributes,
    };
    let tbs = info.to_der().map_err(der_err)?;
    let signature = match kind {
        WorkloadKeyType::EcdsaP256 => {
            use p256::pkcs8::DecodePrivateKey;
            let key = p256::ecdsa::SigningKey::from_pkcs8_pem(&key_pem).map_err(der_err)?;
            let sig: p256::ecdsa::Signature = signature::Signer::sign(&key, &tbs);
            sig.to_der().as_bytes().to_vec()
        }
        WorkloadKeyType::Rsa2048 => {
            use rsa::pkcs8::DecodePrivateKey;
            let key = rsa::PrivateKey::from_pkcs8_pem(&key_pem).map_err(der_err)?;
            let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(key);
            let sig: rsa::pkcs1v15::Signature = signature::Signer::sign(&signer, &tbs);
            <rsa::pkcs1v15::Signature as signature::SignatureEncoding>::to_vec(&sig)
        }
    };
    let req = CertReq {
        info,
        algorithm: alg.signature_algorithm(),
        signature: der::asn1::BitString::from_bytes(&signature).map_err(der_err)?,
    };
    Ok(WorkloadKey {
        key_pem,
        csr_pem: req.to_pem(der::pem::LineEnding::LF).map_err(der_err)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_verifies_and_asks_for_the_identity() {
        let id = "spiffe://cluster.local/ns/foo/sa/httpbin";
        let k = generate(WorkloadKeyType::EcdsaP256, id).unwrap();
        let csr = crate::issuance::check_csr(&k.csr_pem).unwrap();
        assert_eq!(csr.uri_sans, vec![id.to_string()]);
        assert_eq!(csr.key_type, "ecdsa-p256");
        assert!(k.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(format!("{k:?}"), "WorkloadKey { key_pem: \"...\" }");
    }
}
