//! The policy engine of hsmca: decides what may be signed.
//!
//! `evaluate(&Policy, &Request) -> Decision`. This crate is pure: no I/O, no clock it is not
//! handed, no HSM, no network. That keeps every decision reproducible and exhaustively
//! testable. Reading the policy file is the caller's job; [`Policy::parse`] takes its text.
#![forbid(unsafe_code)]

mod duration;
mod evaluate;
mod glob;
mod model;
mod spiffe;
mod template;

pub use duration::{DurationError, format_duration, parse_duration};
pub use evaluate::{Allowed, Decision, Denied, DenyKind, Request, evaluate};
pub use glob::Glob;
pub use model::{
    AUTHENTICATORS, CsrSans, DEFAULT_POLICY, Defaults, DenyRule, KEY_TYPES, Policy, PolicyError,
    Rule, Selector,
};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use template::{SanKind, Template, Vars, valid_dns};
