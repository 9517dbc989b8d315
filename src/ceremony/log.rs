//! The audit log of a ceremony.

use super::*;

/// The audit log of a ceremony (or of `hsmca init`). Each action is made durable as a
/// `ceremony` record (`decision` `allow`) before its result is written out; a failure after
/// the log was opened is recorded as `failed`; [`CeremonyLog::finish`] closes the log (a
/// `stop` record and a checkpoint signed by the audit key) and verifies all of it with the
/// audit public key. Without a log (no `[audit]` table) every method does nothing.
pub(crate) struct CeremonyLog {
    inner: Option<OpenLog>,
}

pub(super) struct OpenLog {
    log: AuditLog,
    dir: PathBuf,
    key: PublicKey,
    what: String,
    /// Printed after a successful ceremony (`hsmca audit verify ...`); none for `init`.
    verify_hint: Option<String>,
}

impl CeremonyLog {
    /// No audit log: nothing is recorded.
    pub(crate) fn disabled() -> Self {
        CeremonyLog { inner: None }
    }

    /// Opens (or continues) the log in `dir`, sealed by `sealer`. `what` names the ceremony in
    /// the `failed` record. An existing log must verify with the sealer's key: a ceremony does
    /// not continue, and seal, a log it cannot vouch for.
    pub(crate) fn open(dir: &Path, sealer: HsmSigner, what: &str) -> anyhow::Result<Self> {
        let key = sealer.public_key().clone();
        let log = AuditLog::open(dir, Some(Arc::new(sealer)), AuditOptions::default())
            .with_context(|| format!("opening the audit log in {}", dir.display()))?;
        if let Err(problem) = crate::audit::verify(dir, &key, u64::MAX) {
            // Dropped without close(): nothing more is written to it.
            drop(log);
            bail!(
                "the audit log in {} does not verify with the audit key ({problem}); refusing \
                 to continue it",
                dir.display()
            );
        }
        Ok(CeremonyLog {
            inner: Some(OpenLog {
                log,
                dir: dir.to_owned(),
                key,
                what: what.to_owned(),
                verify_hint: None,
            }),
        })
    }

    /// Appends a `ceremony` record (`decision` `allow`, `reason` set) and waits until it is
    /// on disk.
    pub(crate) fn record(&self, reason: String, record: Record) -> anyhow::Result<()> {
        let Some(open) = &self.inner else {
            return Ok(());
        };
        open.log
            .append_durable_blocking(Record {
                kind: Kind::Ceremony,
                decision: Some("allow".into()),
                reason: Some(reason.clone()),
                ..record
            })
            .with_context(|| {
                format!(
                    "recording in the audit log {}: {reason}",
                    open.dir.display()
                )
            })?;
        Ok(())
    }

    /// Records a key generation (with the SHA-256 of the public key's SPKI).
    pub(crate) fn key_generated(
        &self,
        token: &Token,
        algorithm: KeyAlgorithm,
        info: &KeyInfo,
    ) -> anyhow::Result<()> {
        let mut reason = generated_text(token, algorithm, info);
        if let Some(public) = &info.public_key {
            reason.push_str(&format!(
                ", public key SHA-256 {}",
                sha256_hex(public.spki_der())
            ));
        }
        self.record(reason, Record::default())
    }

    /// Records a certificate made or imported: its serial, validity, subject (as `identities`)
    /// and the SHA-256 of its DER.
    pub(crate) fn certificate(
        &self,
        reason: String,
        cert: &x509_cert::Certificate,
    ) -> anyhow::Result<()> {
        let tbs = cert.tbs_certificate();
        let der = der::Encode::to_der(cert)?;
        self.record(
            reason,
            Record {
                serial: Some(crate::issuance::serial_hex(tbs.serial_number())),
                not_before: Some(rfc3339(tbs.validity().not_before)),
                not_after: Some(rfc3339(tbs.validity().not_after)),
                identities: vec![tbs.subject().to_string()],
                cert_sha256: Some(sha256_hex(&der)),
                ..Default::default()
            },
        )
    }

    /// Records the failure (when `result` is one), closes the log and verifies it: every
    /// record chained and sealed by the audit key. A log that does not verify fails the
    /// ceremony.
    pub(crate) fn finish<T>(self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        let Some(open) = self.inner else {
            return result;
        };
        if let Err(e) = &result {
            let failed = Record {
                kind: Kind::Failed,
                reason: Some(format!("{} failed: {e:#}", open.what)),
                ..Default::default()
            };
            match open.log.append_durable_blocking(failed) {
                Ok(_) => eprintln!(
                    "the failure is recorded in the audit log {}",
                    open.dir.display()
                ),
                Err(ae) => eprintln!("error: the failure could not be recorded: {ae}"),
            }
        }
        open.log.close();
        let sealed = crate::audit::verify(&open.dir, &open.key, 0).map_err(|problem| {
            anyhow::anyhow!(
                "the audit log {} does not verify after the ceremony: {problem}",
                open.dir.display()
            )
        });
        match (result, sealed) {
            (Ok(value), Ok(report)) => {
                if let Some(hint) = &open.verify_hint {
                    println!(
                        "audit log {}: {} records, sealed by the audit key and verified; \
                         check it with `{hint}`",
                        open.dir.display(),
                        report.records
                    );
                }
                Ok(value)
            }
            (Ok(_), Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(e),
            (Err(e), Err(sealing)) => {
                eprintln!("error: {sealing:#}");
                Err(e)
            }
        }
    }
}

/// Refuses an audit key that is also a CA key of the ceremony: the audit key signs only
/// checkpoints.
pub(super) fn check_audit_label(
    audit: Option<&AuditConfig>,
    ca_keys: &[&str],
) -> anyhow::Result<()> {
    if let Some(a) = audit
        && ca_keys.contains(&a.key_label.as_str())
    {
        bail!(
            "audit.key_label {:?} is a CA key of this ceremony; the audit key must be a key of \
             its own",
            a.key_label
        );
    }
    Ok(())
}

/// Opens the audit log of a ceremony from its `[audit]` table (audit key in `token`,
/// generated when asked and missing), and records the start of the ceremony. Without an
/// `[audit]` table, warns that the ceremony is not recorded.
pub(super) fn open_log(
    audit: Option<&AuditConfig>,
    base: &Path,
    token: &Arc<Token>,
    kind: &str,
    config: &Path,
    digest: &str,
) -> anyhow::Result<CeremonyLog> {
    let Some(a) = audit else {
        eprintln!(
            "warning: {} has no [audit] table: this {kind} ceremony is NOT recorded in an audit \
             log",
            config.display()
        );
        return Ok(CeremonyLog::disabled());
    };
    let dir = base.join(&a.dir);
    let pem = match &a.public_key {
        Some(p) => base.join(p),
        None => dir
            .parent()
            .unwrap_or(Path::new("."))
            .join(crate::state_dir::AUDIT_KEY_PEM),
    };
    let generated = match token.key_info(&a.key_label) {
        Ok(_) => None,
        Err(hsmca_hsm::Error::KeyNotFound(..)) if a.generate_key => {
            if pem.exists() {
                bail!(
                    "audit key {:?} is not in token {:?}, but its public key {} exists: wrong \
                     token or label? Refusing to make another audit key",
                    a.key_label,
                    token.label(),
                    pem.display()
                );
            }
            let algorithm = KeyAlgorithm::EcdsaP256;
            let info = token.generate_key(&a.key_label, algorithm)?;
            println!(
                "{} (audit key): sensitive, never extractable",
                generated_text(token, algorithm, &info)
            );
            Some((algorithm, info))
        }
        Err(hsmca_hsm::Error::KeyNotFound(..)) => bail!(
            "audit key {:?} is not in token {:?}: generate it, or set generate_key = true in \
             [audit]",
            a.key_label,
            token.label()
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("looking up audit key {:?}", a.key_label));
        }
    };
    let sealer = signer(token.clone(), &a.key_label)?;
    if pem.exists() {
        let text = std::fs::read(&pem).with_context(|| format!("reading {}", pem.display()))?;
        let published = der::DecodePem::from_pem(&text)
            .map_err(|e: der::Error| {
                anyhow::anyhow!("{}: not a PEM public key: {e}", pem.display())
            })
            .and_then(|spki: spki::SubjectPublicKeyInfoOwned| {
                Ok(PublicKey::from_spki_der(&der::Encode::to_der(&spki)?)?)
            })?;
        if &published != sealer.public_key() {
            bail!(
                "{} is not the public key of audit key {:?} in token {:?}",
                pem.display(),
                a.key_label,
                token.label()
            );
        }
    } else {
        crate::state_dir::write_public_key_pem(&pem, sealer.public_key())?;
        println!("wrote the audit public key {}", pem.display());
    }
    let what = format!("{kind} ceremony");
    let mut log = CeremonyLog::open(&dir, sealer, &what)?;
    if let Some(open) = log.inner.as_mut() {
        open.verify_hint = Some(format!(
            "hsmca audit verify {} --key {}",
            dir.display(),
            pem.display()
        ));
    }
    println!(
        "recording this ceremony in the audit log {}, sealed by audit key {:?} in token {:?}",
        dir.display(),
        a.key_label,
        token.label()
    );
    log.record(
        format!(
            "began {what} from {} (SHA-256 {digest})",
            std::path::absolute(config)
                .unwrap_or_else(|_| config.to_owned())
                .display()
        ),
        Record::default(),
    )?;
    if let Some((algorithm, info)) = generated {
        log.key_generated(token, algorithm, &info)?;
    }
    Ok(log)
}
