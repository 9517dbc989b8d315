//! `hsmca audit verify`: every hash link, every sequence number, every checkpoint signature,
//! and how much of the tail is unsealed. The first problem is reported with its file, line and
//! record number.

use std::path::{Path, PathBuf};

use base64::Engine;
use hsmca_hsm::PublicKey;

use super::{CHECKPOINT_CONTEXT, GENESIS, Kind, Record, log_files, sha256_hex};

/// The first thing wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// The record's sequence number, when it parsed.
    pub seq: Option<u64>,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: ", self.file.display(), self.line)?;
        if let Some(seq) = self.seq {
            write!(f, "record {seq}: ")?;
        }
        f.write_str(&self.what)
    }
}

/// What a verification found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// Records after the last checkpoint.
    pub unsealed_tail: u64,
}

/// A record as read back: its file, 1-based line, and the record or why it does not parse.
pub type ReadRecord = (PathBuf, usize, Result<Record, String>);

/// Every record of the log in `dir` (or one file), in order, with its file and line.
pub fn read_records(path: &Path) -> std::io::Result<Vec<ReadRecord>> {
    let files = if path.is_dir() {
        log_files(path)?
    } else {
        vec![path.to_owned()]
    };
    let mut out = Vec::new();
    for file in files {
        let content = std::fs::read(&file)?;
        for (i, line) in content.split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            out.push((
                file.clone(),
                i + 1,
                serde_json::from_slice(line).map_err(|e| e.to_string()),
            ));
        }
    }
    Ok(out)
}

/// Verifies the log at `path` (a directory of `audit-*.jsonl` files, or one file) against the
/// audit public key. Allows at most `max_unsealed` records after the last checkpoint.
pub fn verify(path: &Path, key: &PublicKey, max_unsealed: u64) -> Result<VerifyReport, Problem> {
    let files = if path.is_dir() {
        log_files(path).map_err(|e| Problem {
            file: path.to_owned(),
            line: 0,
            seq: None,
            what: e.to_string(),
        })?
    } else {
        vec![path.to_owned()]
    };
    if files.is_empty() {
        return Err(Problem {
            file: path.to_owned(),
            line: 0,
            seq: None,
            what: "no audit-*.jsonl file".into(),
        });
    }
    let key_id = sha256_hex(key.spki_der());
    let mut report = VerifyReport::default();
    let mut prev = GENESIS.to_string();
    let mut expected_seq = 0u64;
    let mut last_seen: Option<(PathBuf, usize, u64)> = None;
    for file in &files {
        let content = std::fs::read(file).map_err(|e| Problem {
            file: file.clone(),
            line: 0,
            seq: None,
            what: e.to_string(),
        })?;
        let lines: Vec<&[u8]> = content.split(|b| *b == b'\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let at = |seq: Option<u64>, what: String| Problem {
                file: file.clone(),
                line: i + 1,
                seq,
                what,
            };
            let last = i + 1 == lines.len();
            if last {
                if !line.is_empty() {
                    return Err(at(
                        None,
                        "the log ends in the middle of a line (truncated or torn write)".into(),
                    ));
                }
                break;
            }
            let record: Record =
                serde_json::from_slice(line).map_err(|e| at(None, format!("not a record: {e}")))?;
            let seq = Some(record.seq);
            if record.v != 1 {
                return Err(at(seq, format!("unknown schema version {}", record.v)));
            }
            if record.seq != expected_seq {
                let what = if record.seq > expected_seq {
                    format!(
                        "expected record {expected_seq}: {} record(s) missing before this one",
                        record.seq - expected_seq
                    )
                } else {
                    format!("expected record {expected_seq}: records are out of order or repeated")
                };
                return Err(at(seq, what));
            }
            if record.prev != prev {
                let what = match &last_seen {
                    Some((f, l, s)) => format!(
                        "hash link broken: this record does not follow record {s} ({}:{l}) as written: \
                         record {s} was edited, or records between them were removed",
                        f.display()
                    ),
                    None => "hash link broken: the first record does not start the chain".into(),
                };
                return Err(at(seq, what));
            }
            if record.kind == Kind::Checkpoint {
                let sig_b64 = record.sig.as_deref().unwrap_or_default();
                let sig = base64::engine::general_purpose::STANDARD
                    .decode(sig_b64)
                    .map_err(|_| at(seq, "checkpoint signature is not base64".into()))?;
                if record.key_id.as_deref() != Some(key_id.as_str()) {
                    return Err(at(
                        seq,
                        "checkpoint was signed by another key than the audit key given".into(),
                    ));
                }
                let needle = format!("\"sig\":\"{sig_b64}\"");
                let text = std::str::from_utf8(line).map_err(|_| at(seq, "not UTF-8".into()))?;
                if text.matches(&needle).count() != 1 {
                    return Err(at(seq, "checkpoint signature field is malformed".into()));
                }
                let mut message = CHECKPOINT_CONTEXT.to_vec();
                message.extend_from_slice(text.replace(&needle, "\"sig\":\"\"").as_bytes());
                let alg = key
                    .algorithm()
                    .ok_or_else(|| at(seq, "audit key is not a supported key".into()))?;
                key.verify(alg.signature_algorithm().oid, &message, &sig)
                    .map_err(|_| at(seq, "checkpoint signature does not verify: the checkpoint or its chain was altered".into()))?;
                report.checkpoints += 1;
                report.unsealed_tail = 0;
            } else {
                report.unsealed_tail += 1;
            }
            prev = sha256_hex(line);
            expected_seq += 1;
            report.records += 1;
            last_seen = Some((file.clone(), i + 1, record.seq));
        }
    }
    if report.unsealed_tail > max_unsealed {
        let (file, line, seq) = last_seen.unwrap_or((path.to_owned(), 0, 0));
        return Err(Problem {
            file,
            line,
            seq: Some(seq),
            what: format!(
                "{} records after the last checkpoint are unsealed (allowed: {max_unsealed})",
                report.unsealed_tail
            ),
        });
    }
    Ok(report)
}
