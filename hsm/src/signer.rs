//! Signing with a key that stays in the token.

use std::sync::Arc;

use der::asn1::ObjectIdentifier;

use crate::session_pool::{PooledSession, SessionPool};
use crate::{Error, KeyAlgorithm, PublicKey, Result, Token};

/// One small signing interface (after rustls' `Signer`): the CA pipeline depends only on this.
pub trait Signer: Send + Sync {
    /// The key algorithm, which fixes the certificate signature algorithm.
    fn algorithm(&self) -> KeyAlgorithm;
    /// The public key of the signing key.
    fn public_key(&self) -> &PublicKey;
    /// Signs `message`, returning the X.509 signature value (a DER ECDSA-Sig-Value for ECDSA,
    /// the PKCS#1 v1.5 signature for RSA).
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>>;
    /// True when [`Signer::sign`] has already verified every signature it returns against
    /// [`Signer::public_key`], so a caller need not verify the same bytes again.
    fn verifies_signatures(&self) -> bool {
        false
    }
}

/// How a signer uses its key.
#[derive(Debug, Clone)]
pub struct SignerOptions {
    /// How many sessions may sign at once.
    pub sessions: usize,
    /// Use the key even when its attributes show it is or was extractable or not sensitive.
    /// Logged loudly every time a signer is opened.
    pub allow_insecure_key: bool,
}

/// How long a signature may wait for a free session before the HSM counts as not answering.
const SESSION_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Default for SignerOptions {
    fn default() -> Self {
        SignerOptions {
            sessions: std::thread::available_parallelism().map_or(2, |n| n.get()),
            allow_insecure_key: false,
        }
    }
}

/// A [`Signer`] whose private key lives in a PKCS#11 token.
pub struct HsmSigner {
    token: Arc<Token>,
    key_label: String,
    algorithm: KeyAlgorithm,
    public_key: PublicKey,
    pool: SessionPool,
}

impl std::fmt::Debug for HsmSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HsmSigner")
            .field("token", &self.token.label())
            .field("key", &self.key_label)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl HsmSigner {
    /// Opens the key labelled `key_label` for signing, after checking that it is a protected
    /// CA key (sensitive and never extractable) and reading its public key.
    pub fn open(token: Arc<Token>, key_label: &str, options: &SignerOptions) -> Result<Self> {
        let info = token.key_info(key_label)?;
        if let Err(e) = info.security.require_protected(key_label) {
            if options.allow_insecure_key {
                tracing::error!(
                    key = key_label,
                    token = token.label(),
                    problems = ?info.security.problems(),
                    "USING AN UNPROTECTED CA KEY because the insecure-key override is set: \
                     this key may exist outside the token"
                );
            } else {
                return Err(e);
            }
        }
        let public_key = info.public_key.ok_or_else(|| {
            Error::PublicKey(format!(
                "no readable public key object for key {key_label:?}"
            ))
        })?;
        let algorithm = public_key
            .algorithm()
            .ok_or_else(|| Error::UnsupportedKey(public_key.type_name()))?;
        let signer = HsmSigner {
            token,
            key_label: key_label.to_owned(),
            algorithm,
            public_key,
            pool: SessionPool::new(options.sessions),
        };
        // Prove the key signs before anyone depends on it.
        signer.sign(b"hsmca self-test")?;
        Ok(signer)
    }

    /// The token the key is in.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    /// The key label.
    pub fn key_label(&self) -> &str {
        &self.key_label
    }

    /// How many sessions may sign at once.
    pub fn sessions(&self) -> usize {
        self.pool.size()
    }

    fn open_session(&self) -> Result<PooledSession> {
        let (session, generation) = self.token.open_session_gen()?;
        let key = {
            let _call = self.token.module().calls();
            self.token.find_private_key(&session, &self.key_label)?
        };
        Ok(PooledSession {
            session,
            key,
            generation,
        })
    }

    /// One `C_Sign` on a pooled session. A lost session or login is recovered once by
    /// reopening and logging in again; a second failure is returned. The result is the token's
    /// raw output (`r || s` for ECDSA) and is NOT verified: the CA uses [`Signer::sign`]; this
    /// exists for benchmarks of the token itself.
    pub fn sign_raw(&self, message: &[u8]) -> Result<Vec<u8>> {
        let (mechanism, input) = self.algorithm.sign_input(message);
        let mut retried = false;
        loop {
            let pooled = self.pool.take(|| self.open_session(), SESSION_WAIT)?;
            let module = self.token.module();
            let call = module.calls();
            if pooled.generation != module.generation() {
                // Opened before the module was re-initialised: dead.
                drop(call);
                pooled.abandon();
                self.pool.forget();
                continue;
            }
            let result = pooled.session.sign(&mechanism, pooled.key, &input);
            drop(call);
            match result {
                Ok(sig) => {
                    self.pool.give_back(pooled);
                    return Ok(sig);
                }
                Err(e) => {
                    let err = Error::from(e);
                    if err.is_session_lost() {
                        pooled.abandon();
                    } else {
                        drop(pooled);
                    }
                    self.pool.forget();
                    if err.is_session_lost() && !retried {
                        tracing::warn!(
                            token = self.token.label(),
                            key = %self.key_label,
                            error = %err,
                            "HSM session lost; reopening and retrying once"
                        );
                        self.pool.clear_idle();
                        retried = true;
                        continue;
                    }
                    return Err(err);
                }
            }
        }
    }
}

impl Signer for HsmSigner {
    fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    fn verifies_signatures(&self) -> bool {
        true
    }

    fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let raw = self.sign_raw(message)?;
        let sig = match self.algorithm {
            KeyAlgorithm::EcdsaP256 => p256::ecdsa::Signature::from_slice(&raw)
                .map_err(|_| Error::BadSignature(self.key_label.clone()))?
                .to_der()
                .as_bytes()
                .to_vec(),
            KeyAlgorithm::EcdsaP384 => p384::ecdsa::Signature::from_slice(&raw)
                .map_err(|_| Error::BadSignature(self.key_label.clone()))?
                .to_der()
                .as_bytes()
                .to_vec(),
            _ => raw,
        };
        let oid: ObjectIdentifier = self.algorithm.signature_algorithm().oid;
        self.public_key
            .verify(oid, message, &sig)
            .map_err(|_| Error::BadSignature(self.key_label.clone()))?;
        Ok(sig)
    }
}
