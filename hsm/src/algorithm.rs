//! The key algorithms a CA key may have, and what each means for PKCS#11 and X.509.

use std::fmt;
use std::str::FromStr;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::Attribute;
use der::asn1::ObjectIdentifier;
use der::{Any, Tag};
use spki::AlgorithmIdentifierOwned;

/// A CA key algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256, signing with SHA-256.
    EcdsaP256,
    /// ECDSA on NIST P-384, signing with SHA-384.
    EcdsaP384,
    /// RSA 2048, PKCS#1 v1.5 with SHA-256.
    Rsa2048,
    /// RSA 3072, PKCS#1 v1.5 with SHA-256.
    Rsa3072,
    /// RSA 4096, PKCS#1 v1.5 with SHA-256.
    Rsa4096,
}

pub(crate) const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
pub(crate) const OID_P384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_ECDSA_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const OID_ECDSA_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const OID_SHA256_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");

impl KeyAlgorithm {
    /// All algorithms, in the order they are listed to users.
    pub const ALL: [KeyAlgorithm; 5] = [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Rsa2048,
        KeyAlgorithm::Rsa3072,
        KeyAlgorithm::Rsa4096,
    ];

    /// The configuration name (`ecdsa-p256`, `rsa-2048`, ...).
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::EcdsaP256 => "ecdsa-p256",
            KeyAlgorithm::EcdsaP384 => "ecdsa-p384",
            KeyAlgorithm::Rsa2048 => "rsa-2048",
            KeyAlgorithm::Rsa3072 => "rsa-3072",
            KeyAlgorithm::Rsa4096 => "rsa-4096",
        }
    }

    /// True for the ECDSA algorithms.
    pub fn is_ec(self) -> bool {
        matches!(self, KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384)
    }

    /// RSA modulus size in bits, for RSA algorithms.
    pub fn rsa_bits(self) -> Option<u64> {
        match self {
            KeyAlgorithm::Rsa2048 => Some(2048),
            KeyAlgorithm::Rsa3072 => Some(3072),
            KeyAlgorithm::Rsa4096 => Some(4096),
            _ => None,
        }
    }

    /// The RSA algorithm for a modulus size.
    pub fn from_rsa_bits(bits: u64) -> Option<Self> {
        match bits {
            2048 => Some(KeyAlgorithm::Rsa2048),
            3072 => Some(KeyAlgorithm::Rsa3072),
            4096 => Some(KeyAlgorithm::Rsa4096),
            _ => None,
        }
    }

    /// The X.509 signature algorithm a key of this kind signs certificates with.
    pub fn signature_algorithm(self) -> AlgorithmIdentifierOwned {
        match self {
            KeyAlgorithm::EcdsaP256 => AlgorithmIdentifierOwned {
                oid: OID_ECDSA_SHA256,
                parameters: None,
            },
            KeyAlgorithm::EcdsaP384 => AlgorithmIdentifierOwned {
                oid: OID_ECDSA_SHA384,
                parameters: None,
            },
            _ => AlgorithmIdentifierOwned {
                oid: OID_SHA256_RSA,
                parameters: Some(Any::new(Tag::Null, Vec::new()).expect("NULL is valid")),
            },
        }
    }

    /// DER of the curve OID, for CKA_EC_PARAMS.
    pub(crate) fn ec_params(self) -> Option<Vec<u8>> {
        let oid = match self {
            KeyAlgorithm::EcdsaP256 => OID_P256,
            KeyAlgorithm::EcdsaP384 => OID_P384,
            _ => return None,
        };
        Some(der::Encode::to_der(&oid).expect("an OID encodes"))
    }

    pub(crate) fn keygen_mechanism(self) -> Mechanism<'static> {
        if self.is_ec() {
            Mechanism::EccKeyPairGen
        } else {
            Mechanism::RsaPkcsKeyPairGen
        }
    }

    /// Algorithm-specific attributes of the public key template.
    pub(crate) fn public_template(self) -> Vec<Attribute> {
        match (self.ec_params(), self.rsa_bits()) {
            (Some(params), _) => vec![Attribute::EcParams(params)],
            (None, Some(bits)) => vec![
                Attribute::ModulusBits(bits.into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            ],
            (None, None) => unreachable!("every algorithm is EC or RSA"),
        }
    }

    /// The mechanism used with `C_Sign`, and the bytes handed to it for a message.
    ///
    /// ECDSA hashes on the host and signs the digest with CKM_ECDSA (SoftHSM 2.6.1 refuses
    /// CKM_ECDSA_SHA256); RSA uses CKM_SHA256_RSA_PKCS over the message.
    pub(crate) fn sign_input(self, message: &[u8]) -> (Mechanism<'static>, Vec<u8>) {
        use sha2::Digest;
        match self {
            KeyAlgorithm::EcdsaP256 => (Mechanism::Ecdsa, sha2::Sha256::digest(message).to_vec()),
            KeyAlgorithm::EcdsaP384 => (Mechanism::Ecdsa, sha2::Sha384::digest(message).to_vec()),
            _ => (Mechanism::Sha256RsaPkcs, message.to_vec()),
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KeyAlgorithm::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = KeyAlgorithm::ALL.iter().map(|a| a.name()).collect();
                format!(
                    "unknown key algorithm {s:?}; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for alg in KeyAlgorithm::ALL {
            assert_eq!(alg.name().parse::<KeyAlgorithm>().unwrap(), alg);
        }
        assert!("rsa-1024".parse::<KeyAlgorithm>().is_err());
    }

    #[test]
    fn curve_params_are_der_oids() {
        assert_eq!(
            KeyAlgorithm::EcdsaP256.ec_params().unwrap(),
            [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
        );
        assert_eq!(
            KeyAlgorithm::EcdsaP384.ec_params().unwrap(),
            [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]
        );
    }
}
