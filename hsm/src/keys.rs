//! What we know about a key in the token, and whether it is fit to be a CA key.

use crate::{KeyAlgorithm, PublicKey};

/// The security attributes of a private key, as the token reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySecurity {
    /// CKA_TOKEN: stored in the token, not a session object.
    pub token: bool,
    /// CKA_PRIVATE: only usable after login.
    pub private: bool,
    /// CKA_SENSITIVE: the value cannot be read.
    pub sensitive: bool,
    /// CKA_EXTRACTABLE: the key can be wrapped out of the token.
    pub extractable: bool,
    /// CKA_ALWAYS_SENSITIVE: sensitive since it was created.
    pub always_sensitive: bool,
    /// CKA_NEVER_EXTRACTABLE: never was extractable.
    pub never_extractable: bool,
    /// CKA_SIGN.
    pub sign: bool,
    /// CKA_DECRYPT.
    pub decrypt: bool,
    /// CKA_UNWRAP.
    pub unwrap: bool,
    /// CKA_DERIVE.
    pub derive: bool,
    /// CKA_LOCAL: generated inside the token.
    pub local: bool,
}

impl KeySecurity {
    /// Why this key must not be a CA key; empty when it is fit.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.sensitive {
            problems.push("CKA_SENSITIVE is false: its value can be read".into());
        }
        if self.extractable {
            problems.push("CKA_EXTRACTABLE is true: it can be exported".into());
        }
        if !self.always_sensitive {
            problems.push("CKA_ALWAYS_SENSITIVE is false: it was readable at some time".into());
        }
        if !self.never_extractable {
            problems.push(
                "CKA_NEVER_EXTRACTABLE is false: it was imported or exportable at some time".into(),
            );
        }
        if !self.token {
            problems.push("CKA_TOKEN is false: it is a session object".into());
        }
        if !self.private {
            problems.push("CKA_PRIVATE is false: it is usable without login".into());
        }
        if !self.sign {
            problems.push("CKA_SIGN is false: it cannot sign".into());
        }
        problems
    }
}

/// A private key in the token.
#[derive(Debug, Clone, Default)]
pub struct KeyInfo {
    /// CKA_LABEL.
    pub label: String,
    /// CKA_ID.
    pub id: Vec<u8>,
    /// The CA key algorithm, when the key is one we support.
    pub algorithm: Option<KeyAlgorithm>,
    /// The public key, when the token holds a matching public key object.
    pub public_key: Option<PublicKey>,
    /// Its security attributes.
    pub security: KeySecurity,
}
