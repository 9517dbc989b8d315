//! The audit log: every decision, allow or deny, as one JSON line, hash-chained, sealed by
//! checkpoints signed with an audit key in the token, and durable before a certificate is
//! returned.
//!
//! Schema (version 1), one object per line, in `DIR/audit-NNNNNN.jsonl` files:
//!
//! | field | meaning |
//! |---|---|
//! | `v` | schema version, 1 |
//! | `seq` | record number, from 0, +1 per record across files |
//! | `time` | RFC 3339 UTC time the record was written |
//! | `prev` | SHA-256 (hex) of the previous record's line (without its newline); 64 zeros for the first |
//! | `kind` | `start`, `decision`, `signing`, `signed`, `failed`, `checkpoint`, `recovered`, `ceremony`, `stop` |
//! | other fields | see [`Record`]; absent when not known |
//!
//! A `checkpoint` carries `sig`: the base64 signature, by the audit key, of the checkpoint's own
//! line with `"sig":""`; since the line holds `prev`, it seals every record before it.

mod record;
mod verify;
mod writer;

pub use record::{Kind, Record};
pub use verify::{Problem, VerifyReport, read_records, verify};
pub use writer::{AuditError, AuditLog, AuditOptions};

/// The first `prev`.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The domain-separation prefix of checkpoint signatures.
pub const CHECKPOINT_CONTEXT: &[u8] = b"hsmca-audit-checkpoint-v1\n";

/// Log files in order.
pub fn log_files(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// SHA-256 hex of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests;
