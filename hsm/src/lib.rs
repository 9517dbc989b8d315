//! PKCS#11 access for hsmca.
//!
//! This crate owns everything that speaks to a token: loading a module, selecting a token by
//! label, logging in with a PIN held in zeroizing memory, generating CA keys that can never
//! leave the token, checking the security attributes of a key before it is used, a pool of
//! logged-in sessions, and signing. Every signature the token returns is verified against the
//! key's public key before it is handed out.
//!
//! It must never: export a private key, log or print a PIN, or select a token by slot number.
//! Nothing outside this crate touches `cryptoki`.
#![forbid(unsafe_code)]

mod algorithm;
mod error;
mod keys;
mod pin;
mod public_key;
mod session_pool;
mod signer;
mod token;

pub use algorithm::KeyAlgorithm;
pub use error::{Error, Result};
pub use keys::{KeyInfo, KeySecurity};
pub use pin::{Pin, PinSource};
pub use public_key::PublicKey;
pub use signer::{HsmSigner, Signer, SignerOptions};
pub use token::{Module, Token, TokenConfig, default_module_path};
