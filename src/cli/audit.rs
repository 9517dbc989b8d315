//! `hsmca audit verify` and `hsmca audit show`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use der::DecodePem;
use hsmca_hsm::PublicKey;

use super::AuditCommand;
use crate::audit::{Kind, Record};

fn default_key(path: &Path) -> PathBuf {
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    dir.parent()
        .unwrap_or(Path::new("."))
        .join(crate::state_dir::AUDIT_KEY_PEM)
}

fn read_key(path: &Path) -> anyhow::Result<PublicKey> {
    let pem = std::fs::read(path)
        .with_context(|| format!("reading the audit public key {}", path.display()))?;
    let spki = spki::SubjectPublicKeyInfoOwned::from_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: not a PEM public key: {e}", path.display()))?;
    Ok(PublicKey::from_spki_der(&der::Encode::to_der(&spki)?)?)
}

/// Writes a line to stdout; a closed pipe (`| head`) ends the listing quietly.
macro_rules! emit {
    ($out:expr, $($arg:tt)*) => {
        if let Err(e) = writeln!($out, $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(0);
            }
            return Err(e.into());
        }
    };
}

pub(super) fn run(command: AuditCommand) -> anyhow::Result<i32> {
    match command {
        AuditCommand::Verify {
            path,
            key,
            max_unsealed,
        } => {
            let key_path = key.unwrap_or_else(|| default_key(&path));
            let key = read_key(&key_path)?;
            match crate::audit::verify(&path, &key, max_unsealed) {
                Ok(r) => {
                    println!(
                        "OK: {} records, {} checkpoints verified with {}, {} unsealed at the end",
                        r.records,
                        r.checkpoints,
                        key_path.display(),
                        r.unsealed_tail
                    );
                    Ok(0)
                }
                Err(problem) => {
                    println!("FAILED: {problem}");
                    Ok(1)
                }
            }
        }
        AuditCommand::Show {
            path,
            serial,
            identity,
            since,
            decision,
            json,
        } => {
            let since = since
                .as_deref()
                .map(|s| {
                    s.parse::<jiff::Timestamp>()
                        .with_context(|| format!("--since {s:?} is not RFC 3339"))
                })
                .transpose()?;
            let norm = |s: &str| {
                s.to_ascii_lowercase()
                    .trim_start_matches("0x")
                    .replace(':', "")
                    .trim_start_matches('0')
                    .to_owned()
            };
            let serial = serial.map(|s| norm(&s));
            let records = crate::audit::read_records(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut shown = 0;
            let mut out = std::io::stdout().lock();
            if !json {
                emit!(
                    out,
                    "{:<5} {:<27} {:<10} {:<6} {:<36} {:<45} RULE / REASON",
                    "SEQ",
                    "TIME",
                    "KIND",
                    "DECIS",
                    "SERIAL",
                    "IDENTITY"
                );
            }
            for (file, line, record) in records {
                let record: Record =
                    record.map_err(|e| anyhow::anyhow!("{}:{line}: {e}", file.display()))?;
                if let Some(s) = &serial
                    && record.serial.as_deref().map(norm).as_deref() != Some(s.as_str())
                {
                    continue;
                }
                if let Some(id) = &identity
                    && !record.identities.contains(id)
                    && !record.sans.contains(id)
                    && record.impersonated.as_ref() != Some(id)
                {
                    continue;
                }
                if let Some(d) = &decision
                    && record.decision.as_deref() != Some(d.as_str())
                {
                    continue;
                }
                if let Some(t) = since {
                    match record.time.parse::<jiff::Timestamp>() {
                        Ok(rt) if rt >= t => {}
                        _ => continue,
                    }
                }
                if (decision.is_some() || identity.is_some() || serial.is_some())
                    && record.kind == Kind::Checkpoint
                {
                    continue;
                }
                shown += 1;
                if json {
                    emit!(out, "{}", serde_json::to_string(&record)?);
                } else {
                    emit!(
                        out,
                        "{:<5} {:<27} {:<10} {:<6} {:<36} {:<45} {}",
                        record.seq,
                        record.time,
                        format!("{:?}", record.kind).to_lowercase(),
                        record.decision.as_deref().unwrap_or("-"),
                        record.serial.as_deref().unwrap_or("-"),
                        record
                            .sans
                            .first()
                            .or(record.identities.first())
                            .map_or("-", String::as_str),
                        match (&record.policy_rule, &record.reason) {
                            (Some(r), Some(why)) if why.contains(r.as_str()) => why.clone(),
                            (Some(r), Some(why)) => format!("{r}: {why}"),
                            (Some(r), None) => r.clone(),
                            (None, Some(why)) => why.clone(),
                            (None, None) => String::new(),
                        }
                    );
                }
            }
            if !json {
                emit!(out, "({shown} records)");
            }
            Ok(if shown == 0 { 2 } else { 0 })
        }
    }
}
