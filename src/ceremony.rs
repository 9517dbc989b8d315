//! Production key ceremonies, each driven by one TOML file (as Boulder's ceremony tool):
//! `root`, `intermediate`, `csr` and `import`. Each prints what it did and, with an `[audit]`
//! table, records every action in an audit log sealed by an audit key in the ceremony's token
//! (see [`CeremonyLog`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use der::EncodePem;
use der::pem::LineEnding;
use hsmca_hsm::{
    HsmSigner, KeyAlgorithm, KeyInfo, PinSource, PublicKey, Signer, SignerOptions, Token,
    TokenConfig,
};
use serde::Deserialize;
use x509_cert::name::Name;

use crate::audit::{AuditLog, AuditOptions, Kind, Record, sha256_hex};
use crate::ca::{self, CaFiles};
use crate::files::{Overwrite, write_atomic};

mod config;
mod log;

pub use config::*;
pub(crate) use log::CeremonyLog;
use log::{check_audit_label, open_log};

/// What a key generation did, for the terminal and the audit log.
fn generated_text(token: &Token, algorithm: KeyAlgorithm, info: &KeyInfo) -> String {
    format!(
        "generated {algorithm} key {:?} (CKA_ID {}) in token {:?}",
        info.label,
        hex::encode(&info.id),
        token.label()
    )
}

/// Generates the key when asked, with progress on a terminal for slow algorithms, and
/// records it.
fn key_for(token: &Arc<Token>, key: &KeyConfig, log: &CeremonyLog) -> anyhow::Result<()> {
    if !key.generate {
        return Ok(());
    }
    let algorithm: KeyAlgorithm = key
        .algorithm
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("key.algorithm is required with generate = true"))?
        .parse()
        .map_err(|e: String| anyhow::anyhow!("key.algorithm: {e}"))?;
    let info = crate::cli::with_progress(
        &format!("generating {algorithm} key {:?}", key.label),
        || token.generate_key(&key.label, algorithm),
    )?;
    println!(
        "{}: sensitive, never extractable",
        generated_text(token, algorithm, &info)
    );
    log.key_generated(token, algorithm, &info)
}

fn signer(token: Arc<Token>, label: &str) -> anyhow::Result<HsmSigner> {
    let options = SignerOptions {
        sessions: 1,
        allow_insecure_key: false,
    };
    HsmSigner::open(token, label, &options).with_context(|| format!("opening key {label:?}"))
}

fn describe(cert: &x509_cert::Certificate) -> String {
    let tbs = cert.tbs_certificate();
    format!(
        "subject {}, serial {}, valid {} to {}",
        tbs.subject(),
        crate::issuance::serial_hex(tbs.serial_number()),
        tbs.validity().not_before,
        tbs.validity().not_after
    )
}

/// Creates the directory an output file goes into, before any key is generated: a key must
/// not be made only for the ceremony to fail at writing its result.
fn create_parent(out: &Path) -> anyhow::Result<()> {
    match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the output directory {}", dir.display())),
        None => Ok(()),
    }
}

fn rfc3339(t: x509_cert::time::Time) -> String {
    jiff::Timestamp::try_from(t.to_system_time())
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Fails when any of the three CA files exists in `out`: checked before anything happens, so
/// that a ceremony that could not write its result neither starts nor is recorded.
fn refuse_existing_ca_files(out: &Path) -> anyhow::Result<()> {
    for name in [CaFiles::ROOT, CaFiles::CA, CaFiles::CHAIN] {
        if out.join(name).exists() {
            bail!(
                "{} already exists; refusing to overwrite it",
                out.join(name).display()
            );
        }
    }
    Ok(())
}

/// Runs a root ceremony.
pub fn root(config: &Path) -> anyhow::Result<()> {
    let (c, base, digest): (RootCeremony, _, _) = load(config)?;
    let out = base.join(&c.output.certificate);
    if out.exists() {
        bail!("{} already exists; refusing to overwrite it", out.display());
    }
    let subject = subject(&c.certificate.subject)?;
    let lifetime = validity(&c.certificate.validity)?;
    check_audit_label(c.audit.as_ref(), &[&c.key.label])?;
    create_parent(&out)?;
    let token = c.hsm.open(&base)?;
    let log = open_log(c.audit.as_ref(), &base, &token, "root", config, &digest)?;
    let result = (|| {
        key_for(&token, &c.key, &log)?;
        let signer = signer(token.clone(), &c.key.label)?;
        let root = ca::make_root(&signer, subject, lifetime)?;
        log.certificate(
            format!(
                "signed root certificate {:?} with key {:?} in token {:?}, for {}",
                root.tbs_certificate().subject().to_string(),
                c.key.label,
                token.label(),
                out.display()
            ),
            &root,
        )?;
        write_atomic(&out, ca::to_pem(&root).as_bytes(), 0o644, Overwrite::Never)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("root certificate: {}", describe(&root));
        println!("wrote {}", out.display());
        Ok(())
    })();
    log.finish(result)
}

/// Runs an intermediate ceremony. Its audit key is in the token of the new key (`[hsm]`).
pub fn intermediate(config: &Path) -> anyhow::Result<()> {
    let (c, base, digest): (IntermediateCeremony, _, _) = load(config)?;
    let out = base.join(&c.output.dir);
    let subject = subject(&c.certificate.subject)?;
    let lifetime = validity(&c.certificate.validity)?;
    let issuer_chain = ca::read_pem_certs(&base.join(&c.issuer.certificate))?;
    let issuer_cert = issuer_chain[0].clone();
    refuse_existing_ca_files(&out)?;
    let mut ca_keys = vec![c.key.label.as_str()];
    if c.issuer.hsm.token_label == c.hsm.token_label {
        ca_keys.push(&c.issuer.key_label);
    }
    check_audit_label(c.audit.as_ref(), &ca_keys)?;
    let token = c.hsm.open(&base)?;
    let log = open_log(
        c.audit.as_ref(),
        &base,
        &token,
        "intermediate",
        config,
        &digest,
    )?;
    let result = (|| {
        let issuer_token = c.issuer.hsm.open(&base)?;
        let issuer_label = issuer_token.label().to_owned();
        let issuer_signer = signer(issuer_token, &c.issuer.key_label)?;
        if issuer_signer.public_key() != &ca::cert_public_key(&issuer_cert)? {
            bail!(
                "issuer key {:?} is not the key of {}",
                c.issuer.key_label,
                c.issuer.certificate.display()
            );
        }
        key_for(&token, &c.key, &log)?;
        let key = token.public_key(&c.key.label)?;
        // The new key must be a protected CA key that signs.
        signer(token.clone(), &c.key.label)?;
        let cert = ca::make_intermediate(&issuer_signer, &issuer_cert, key, subject, lifetime)?;
        let files = CaFiles {
            ca_cert: cert,
            chain_above: issuer_chain,
        };
        ca::verify_chain(&files.full_chain(), SystemTime::now())?;
        log.certificate(
            format!(
                "signed intermediate certificate {:?} for key {:?} in token {:?} with issuer \
                 key {:?} in token {:?} ({}), for {}",
                files.ca_cert.tbs_certificate().subject().to_string(),
                c.key.label,
                token.label(),
                c.issuer.key_label,
                issuer_label,
                issuer_cert.tbs_certificate().subject(),
                out.display()
            ),
            &files.ca_cert,
        )?;
        std::fs::create_dir_all(&out)?;
        files.write(&out)?;
        println!("intermediate certificate: {}", describe(&files.ca_cert));
        println!(
            "wrote {}/{{root-cert.pem,ca-cert.pem,cert-chain.pem}}",
            out.display()
        );
        Ok(())
    })();
    log.finish(result)
}

/// Runs a CSR ceremony.
pub fn csr(config: &Path) -> anyhow::Result<()> {
    let (c, base, digest): (CsrCeremony, _, _) = load(config)?;
    let out = base.join(&c.csr.output);
    if out.exists() {
        bail!("{} already exists; refusing to overwrite it", out.display());
    }
    let subject = subject(&c.csr.subject)?;
    check_audit_label(c.audit.as_ref(), &[&c.key.label])?;
    create_parent(&out)?;
    let token = c.hsm.open(&base)?;
    let log = open_log(c.audit.as_ref(), &base, &token, "csr", config, &digest)?;
    let result = (|| {
        key_for(&token, &c.key, &log)?;
        let signer = signer(token.clone(), &c.key.label)?;
        let req = ca::make_csr(&signer, subject)?;
        let der = der::Encode::to_der(&req)?;
        log.record(
            format!(
                "made a CSR for key {:?} ({}) in token {:?}, subject {:?}, for {}",
                c.key.label,
                signer.public_key().type_name(),
                token.label(),
                req.info.subject.to_string(),
                out.display()
            ),
            Record {
                csr_sha256: Some(sha256_hex(&der)),
                identities: vec![req.info.subject.to_string()],
                ..Default::default()
            },
        )?;
        let pem = req.to_pem(LineEnding::LF)?;
        write_atomic(&out, pem.as_bytes(), 0o644, Overwrite::Never)
            .with_context(|| format!("writing {}", out.display()))?;
        println!(
            "CSR for key {:?} ({}), subject {}",
            c.key.label,
            signer.public_key().type_name(),
            req.info.subject
        );
        println!("wrote {}", out.display());
        Ok(())
    })();
    log.finish(result)
}

/// Refuses a certificate that may not issue certificates: basicConstraints must say cA and
/// keyUsage must allow keyCertSign (RFC 5280 4.2.1.9, 4.2.1.3).
fn require_ca(cert: &x509_cert::Certificate, file: &Path) -> anyhow::Result<()> {
    use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};
    let tbs = cert.tbs_certificate();
    let subject = tbs.subject();
    let bad = |e: der::Error| anyhow::anyhow!("{}: {subject}: {e}", file.display());
    match tbs.get_extension::<BasicConstraints>().map_err(bad)? {
        Some((_, BasicConstraints { ca: true, .. })) => {}
        _ => bail!(
            "{}: {subject} is not a CA certificate (basicConstraints cA is not true)",
            file.display()
        ),
    }
    match tbs.get_extension::<KeyUsage>().map_err(bad)? {
        Some((_, usage)) if usage.key_cert_sign() => Ok(()),
        _ => bail!(
            "{}: {subject} may not sign certificates (no keyUsage keyCertSign)",
            file.display()
        ),
    }
}

/// Runs an import ceremony: the signed certificate must certify the token key, be a CA
/// certificate, and chain to a self-signed root.
pub fn import(config: &Path) -> anyhow::Result<()> {
    let (c, base, digest): (ImportCeremony, _, _) = load(config)?;
    let out = base.join(&c.output.dir);
    let cert = ca::read_pem_certs(&base.join(&c.certificate))?.remove(0);
    let chain = ca::read_pem_certs(&base.join(&c.chain))?;
    refuse_existing_ca_files(&out)?;
    check_audit_label(c.audit.as_ref(), &[&c.key_label])?;
    let token = c.hsm.open(&base)?;
    let log = open_log(c.audit.as_ref(), &base, &token, "import", config, &digest)?;
    let result = (|| {
        let signer = signer(token.clone(), &c.key_label)?;
        if signer.public_key() != &ca::cert_public_key(&cert)? {
            bail!(
                "{} does not certify token key {:?}: its public key differs",
                c.certificate.display(),
                c.key_label
            );
        }
        require_ca(&cert, &c.certificate)?;
        for issuer in &chain {
            require_ca(issuer, &c.chain)?;
        }
        let files = CaFiles {
            ca_cert: cert,
            chain_above: chain,
        };
        ca::verify_chain(&files.full_chain(), SystemTime::now())?;
        let root_der = der::Encode::to_der(files.root())?;
        log.certificate(
            format!(
                "imported certificate {:?} for key {:?} in token {:?}, issued by {:?}; chain \
                 verifies to root {:?} (SHA-256 {}), for {}",
                files.ca_cert.tbs_certificate().subject().to_string(),
                c.key_label,
                token.label(),
                files.ca_cert.tbs_certificate().issuer().to_string(),
                files.root().tbs_certificate().subject().to_string(),
                sha256_hex(&root_der),
                out.display()
            ),
            &files.ca_cert,
        )?;
        std::fs::create_dir_all(&out)?;
        files.write(&out)?;
        println!("imported certificate: {}", describe(&files.ca_cert));
        println!(
            "chain verifies to root {}",
            files.root().tbs_certificate().subject()
        );
        println!(
            "wrote {}/{{root-cert.pem,ca-cert.pem,cert-chain.pem}}",
            out.display()
        );
        Ok(())
    })();
    log.finish(result)
}
