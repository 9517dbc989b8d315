//! A software P-256 signer, for unit tests only (the CA path always signs in a token).

use std::sync::atomic::{AtomicUsize, Ordering};

use hsmca_hsm::{KeyAlgorithm, PublicKey, Signer};
use spki::EncodePublicKey;

/// Signs with an in-memory P-256 key and counts its signatures.
pub(crate) struct SoftwareSigner {
    key: p256::ecdsa::SigningKey,
    public: PublicKey,
    pub(crate) signatures: AtomicUsize,
}

impl SoftwareSigner {
    pub(crate) fn new() -> Self {
        let key = <p256::ecdsa::SigningKey as p256::elliptic_curve::Generate>::generate_from_rng(
            &mut rand::rng(),
        );
        let der = key.verifying_key().to_public_key_der().unwrap();
        SoftwareSigner {
            public: PublicKey::from_spki_der(der.as_bytes()).unwrap(),
            key,
            signatures: AtomicUsize::new(0),
        }
    }
}

impl Signer for SoftwareSigner {
    fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::EcdsaP256
    }
    fn public_key(&self) -> &PublicKey {
        &self.public
    }
    fn sign(&self, message: &[u8]) -> hsmca_hsm::Result<Vec<u8>> {
        self.signatures.fetch_add(1, Ordering::SeqCst);
        let sig: p256::ecdsa::Signature = signature::Signer::sign(&self.key, message);
        Ok(sig.to_der().as_bytes().to_vec())
    }
}
