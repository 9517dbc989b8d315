//! Public keys: decoding SubjectPublicKeyInfo, and verifying X.509 signatures.
//!
//! Used both to check every signature the token returns and, by the CA, to check the
//! signature of a CSR.

use std::fmt;

use der::asn1::{BitString, ObjectIdentifier, UintRef};
use der::{Decode, Encode};
use rsa::traits::PublicKeyParts;
use signature::hazmat::PrehashVerifier;
use spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef};

use crate::algorithm::{OID_P256, OID_P384};
use crate::{Error, KeyAlgorithm, Result};

const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_ECDSA_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
const OID_SHA256_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const OID_SHA384_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const OID_SHA512_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");

/// The smallest and largest RSA moduli this CA verifies signatures from.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 4096;

/// A public key we can verify signatures with, with its SubjectPublicKeyInfo DER.
#[derive(Clone)]
pub struct PublicKey {
    spki_der: Vec<u8>,
    /// The subjectPublicKey bits: the SEC1 point, or the PKCS#1 RSAPublicKey.
    key_bits: Vec<u8>,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Rsa { bits: usize },
}

#[derive(Clone, Copy)]
enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn digest(self, message: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        match self {
            Hash::Sha256 => sha2::Sha256::digest(message).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(message).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(message).to_vec(),
        }
    }
}

impl PublicKey {
    /// Decodes a DER SubjectPublicKeyInfo. Supports ECDSA P-256 and P-384 and RSA from 2048
    /// to 4096 bits with a public exponent of at least 65537.
    pub fn from_spki_der(der_bytes: &[u8]) -> Result<Self> {
        let spki = SubjectPublicKeyInfoRef::from_der(der_bytes)
            .map_err(|e| Error::PublicKey(format!("not a SubjectPublicKeyInfo: {e}")))?;
        let key_bytes = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| Error::PublicKey("public key bit string has unused bits".into()))?;
        let kind = match spki.algorithm.oid {
            OID_EC_PUBLIC_KEY => {
                let curve: ObjectIdentifier = spki
                    .algorithm
                    .parameters
                    .ok_or_else(|| Error::PublicKey("EC key without curve parameters".into()))?
                    .decode_as()
                    .map_err(|_| Error::PublicKey("EC key with non-named curve".into()))?;
                match curve {
                    OID_P256 => Kind::P256(
                        p256::ecdsa::VerifyingKey::from_sec1_bytes(key_bytes)
                            .map_err(|_| Error::PublicKey("invalid P-256 point".into()))?,
                    ),
                    OID_P384 => Kind::P384(
                        p384::ecdsa::VerifyingKey::from_sec1_bytes(key_bytes)
                            .map_err(|_| Error::PublicKey("invalid P-384 point".into()))?,
                    ),
                    other => {
                        return Err(Error::UnsupportedKey(format!(
                            "EC curve {other} (only P-256 and P-384 are accepted)"
                        )));
                    }
                }
            }
            OID_RSA_ENCRYPTION => {
                let key = rsa::PublicKey::try_from(spki.clone())
                    .map_err(|e| Error::PublicKey(format!("invalid RSA key: {e}")))?;
                let bits = key.n().bit_width_vartime() as usize;
                if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
                    return Err(Error::UnsupportedKey(format!(
                        "RSA key of {bits} bits (accepted: {RSA_MIN_BITS} to {RSA_MAX_BITS})"
                    )));
                }
                let e = key.e_bytes();
                let e_ok = e.len() > 3 || (e.len() == 3 && e[..] >= [0x01, 0x00, 0x01][..]);
                if !e_ok || e.last().is_some_and(|b| b & 1 == 0) {
                    return Err(Error::UnsupportedKey(
                        "RSA public exponent must be odd and at least 65537".into(),
                    ));
                }
                Kind::Rsa { bits }
            }
            other => {
                return Err(Error::UnsupportedKey(format!(
                    "public key algorithm {other} (accepted: ECDSA P-256/P-384, RSA)"
                )));
            }
        };
        Ok(PublicKey {
            spki_der: der_bytes.to_vec(),
            key_bits: key_bytes.to_vec(),
            kind,
        })
    }

    /// Builds the SubjectPublicKeyInfo of an EC key from its curve and SEC1 (uncompressed) point.
    pub fn from_ec_point(algorithm: KeyAlgorithm, point: &[u8]) -> Result<Self> {
        let curve = match algorithm {
            KeyAlgorithm::EcdsaP256 => OID_P256,
            KeyAlgorithm::EcdsaP384 => OID_P384,
            _ => return Err(Error::PublicKey("not an EC algorithm".into())),
        };
        let spki = SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: OID_EC_PUBLIC_KEY,
                parameters: Some(der::Any::encode_from(&curve).map_err(der_err)?),
            },
            subject_public_key: BitString::from_bytes(point).map_err(der_err)?,
        };
        Self::from_spki_der(&spki.to_der().map_err(der_err)?)
    }

    /// Builds the SubjectPublicKeyInfo of an RSA key from its modulus and exponent.
    pub(crate) fn from_rsa_parts(modulus: &[u8], exponent: &[u8]) -> Result<Self> {
        let pkcs1 = rsa::pkcs1::RsaPublicKey {
            modulus: UintRef::new(modulus).map_err(der_err)?,
            public_exponent: UintRef::new(exponent).map_err(der_err)?,
        };
        let spki = SubjectPublicKeyInfoOwned {
            algorithm: AlgorithmIdentifierOwned {
                oid: OID_RSA_ENCRYPTION,
                parameters: Some(der::Any::new(der::Tag::Null, Vec::new()).map_err(der_err)?),
            },
            subject_public_key: BitString::from_bytes(&pkcs1.to_der().map_err(der_err)?)
                .map_err(der_err)?,
        };
        Self::from_spki_der(&spki.to_der().map_err(der_err)?)
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The decoded SubjectPublicKeyInfo.
    pub fn spki(&self) -> SubjectPublicKeyInfoOwned {
        SubjectPublicKeyInfoOwned::from_der(&self.spki_der).expect("validated at construction")
    }

    /// The raw subjectPublicKey bits (for key identifiers).
    pub fn subject_public_key_bytes(&self) -> Vec<u8> {
        self.spki().subject_public_key.raw_bytes().to_vec()
    }

    /// The CA key algorithm this key matches, if it is one (RSA sizes other than
    /// 2048/3072/4096 are valid for verification but are not CA key algorithms).
    pub fn algorithm(&self) -> Option<KeyAlgorithm> {
        match &self.kind {
            Kind::P256(_) => Some(KeyAlgorithm::EcdsaP256),
            Kind::P384(_) => Some(KeyAlgorithm::EcdsaP384),
            Kind::Rsa { bits, .. } => KeyAlgorithm::from_rsa_bits(*bits as u64),
        }
    }

    /// A short name of the key type and size: `ecdsa-p256`, `rsa-2048`, `rsa-2304`.
    pub fn type_name(&self) -> String {
        match &self.kind {
            Kind::P256(_) => "ecdsa-p256".into(),
            Kind::P384(_) => "ecdsa-p384".into(),
            Kind::Rsa { bits, .. } => format!("rsa-{bits}"),
        }
    }

    /// True for RSA keys.
    pub fn is_rsa(&self) -> bool {
        matches!(self.kind, Kind::Rsa { .. })
    }

    /// Verifies an X.509-style signature (ECDSA as a DER ECDSA-Sig-Value, RSA PKCS#1 v1.5)
    /// over `message`, made with the signature algorithm `algorithm_oid`.
    pub fn verify(
        &self,
        algorithm_oid: ObjectIdentifier,
        message: &[u8],
        sig: &[u8],
    ) -> Result<()> {
        use ring::signature as rs;
        let bad = |what: &str| Error::Verify(what.to_string());
        // ring's assembly-optimised verifiers: measured about 10x faster than the RustCrypto
        // ones for P-256 (see the crate docs); RustCrypto stays for what ring lacks.
        let ring_alg: Option<&'static dyn rs::VerificationAlgorithm> =
            match (&self.kind, algorithm_oid) {
                (Kind::P256(_), OID_ECDSA_SHA256) => Some(&rs::ECDSA_P256_SHA256_ASN1),
                (Kind::P256(_), OID_ECDSA_SHA384) => Some(&rs::ECDSA_P256_SHA384_ASN1),
                (Kind::P384(_), OID_ECDSA_SHA256) => Some(&rs::ECDSA_P384_SHA256_ASN1),
                (Kind::P384(_), OID_ECDSA_SHA384) => Some(&rs::ECDSA_P384_SHA384_ASN1),
                (Kind::Rsa { .. }, OID_SHA256_RSA) => Some(&rs::RSA_PKCS1_2048_8192_SHA256),
                (Kind::Rsa { .. }, OID_SHA384_RSA) => Some(&rs::RSA_PKCS1_2048_8192_SHA384),
                (Kind::Rsa { .. }, OID_SHA512_RSA) => Some(&rs::RSA_PKCS1_2048_8192_SHA512),
                _ => None,
            };
        if let Some(alg) = ring_alg {
            return rs::UnparsedPublicKey::new(alg, &self.key_bits)
                .verify(message, sig)
                .map_err(|_| {
                    bad(if self.is_rsa() {
                        "RSA signature does not match"
                    } else {
                        "ECDSA signature does not match"
                    })
                });
        }
        match &self.kind {
            Kind::P256(key) => {
                let hash = ecdsa_hash(algorithm_oid)?;
                let sig = p256::ecdsa::Signature::from_der(sig)
                    .map_err(|_| bad("malformed ECDSA signature"))?;
                key.verify_prehash(&hash.digest(message), &sig)
                    .map_err(|_| bad("ECDSA signature does not match"))
            }
            Kind::P384(key) => {
                let hash = ecdsa_hash(algorithm_oid)?;
                let sig = p384::ecdsa::Signature::from_der(sig)
                    .map_err(|_| bad("malformed ECDSA signature"))?;
                key.verify_prehash(&hash.digest(message), &sig)
                    .map_err(|_| bad("ECDSA signature does not match"))
            }
            Kind::Rsa { .. } => Err(Error::Verify(format!(
                "signature algorithm {algorithm_oid} is not accepted for an RSA key"
            ))),
        }
    }
}

fn ecdsa_hash(oid: ObjectIdentifier) -> Result<Hash> {
    match oid {
        OID_ECDSA_SHA256 => Ok(Hash::Sha256),
        OID_ECDSA_SHA384 => Ok(Hash::Sha384),
        OID_ECDSA_SHA512 => Ok(Hash::Sha512),
        other => Err(Error::Verify(format!(
            "signature algorithm {other} is not accepted for an EC key"
        ))),
    }
}

fn der_err(e: der::Error) -> Error {
    Error::PublicKey(e.to_string())
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.type_name())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.spki_der == other.spki_der
    }
}
