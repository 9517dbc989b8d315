//! hsmca: a hardened certificate authority whose keys never leave a PKCS#11 token.
//!
//! This crate holds the issuance pipeline, the CA hierarchy and ceremonies, the embedded
//! SoftHSM2 default and the command line. PKCS#11 lives in `hsmca-hsm`; policy decisions in
//! `hsmca-policy`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod audit;
pub mod authn;
pub mod ca;
pub mod ceremony;
pub mod cli;
pub mod files;
pub mod issuance;
pub mod server;
pub mod softhsm;
pub mod state_dir;
