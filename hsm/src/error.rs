//! Errors of the hsm crate. Every PKCS#11 failure names the call that failed.

/// What went wrong while talking to a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The PKCS#11 module could not be loaded or initialised.
    #[error("cannot load PKCS#11 module {path}: {source}")]
    LoadModule {
        /// The module path that was tried.
        path: String,
        /// The underlying failure.
        source: cryptoki::error::Error,
    },
    /// A PKCS#11 call failed; the message names the function (for example `C_Sign`).
    #[error("PKCS#11 {0}")]
    Pkcs11(#[from] cryptoki::error::Error),
    /// No token with this label is present in any slot of the module.
    #[error("no token labelled {0:?} in this PKCS#11 module")]
    TokenNotFound(String),
    /// No private key matches the label or id.
    #[error("no private key labelled {0:?} in token {1:?}")]
    KeyNotFound(String, String),
    /// More than one key matches the label: refuse to guess.
    #[error("{count} private keys are labelled {label:?}; select the key by CKA_ID")]
    AmbiguousKey {
        /// The label searched for.
        label: String,
        /// How many keys carry it.
        count: usize,
    },
    /// Refused to create a key under a label already in use.
    #[error("an object labelled {0:?} already exists in the token; refusing to create another")]
    LabelExists(String),
    /// The key's attributes show it is, or was, extractable or not sensitive.
    #[error("key {label:?} is not a protected CA key: {reason}")]
    InsecureKey {
        /// The key label.
        label: String,
        /// Which attribute failed.
        reason: String,
    },
    /// The key is of a type or size this CA does not use.
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    /// The PIN could not be read.
    #[error("cannot read the PIN: {0}")]
    Pin(String),
    /// The token returned a signature that does not verify under the key's public key.
    #[error("the token returned a signature that does not verify under key {0:?}")]
    BadSignature(String),
    /// A public key from the token, or given to us, could not be decoded.
    #[error("invalid public key: {0}")]
    PublicKey(String),
    /// A signature could not be verified.
    #[error("signature verification failed: {0}")]
    Verify(String),
    /// The HSM did not answer in time.
    #[error("HSM timeout: {0}")]
    Timeout(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// True when the failure means the session or login was lost and a fresh session may succeed.
    pub fn is_session_lost(&self) -> bool {
        use cryptoki::error::RvError::*;
        match self {
            Error::Pkcs11(cryptoki::error::Error::Pkcs11(rv, _)) => matches!(
                rv,
                SessionHandleInvalid
                    | SessionClosed
                    | UserNotLoggedIn
                    | DeviceRemoved
                    | DeviceError
                    | TokenNotPresent
                    | TokenNotRecognized
                    | KeyHandleInvalid
                    | ObjectHandleInvalid
                    | CryptokiNotInitialized
                    | GeneralError
                    | SlotIdInvalid
            ),
            _ => false,
        }
    }

    /// True when the token itself is unreachable (the caller should report "unavailable").
    pub fn is_unavailable(&self) -> bool {
        self.is_session_lost()
            || matches!(
                self,
                Error::LoadModule { .. } | Error::TokenNotFound(_) | Error::Timeout(_)
            )
    }
}
