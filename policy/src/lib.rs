//! The policy engine of hsmca: decides what may be signed.
//!
//! This crate is pure: no I/O, no clock it is not handed, no HSM, no network. That keeps every
//! decision reproducible and exhaustively testable.
#![forbid(unsafe_code)]

mod duration;

pub use duration::{DurationError, format_duration, parse_duration};
mod spiffe;
pub use spiffe::{SpiffeId, SpiffeIdError};
