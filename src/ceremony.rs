//! Production key ceremonies, each driven by one TOML file (as Boulder's ceremony tool):
//! `root`, `intermediate`, `csr` and `import`. Each prints what it did.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use der::EncodePem;
use der::pem::LineEnding;
use hsmca_hsm::{HsmSigner, KeyAlgorithm, PinSource, Signer, SignerOptions, Token, TokenConfig};
use serde::Deserialize;
use x509_cert::name::Name;

use crate::ca::{self, CaFiles};
use crate::files::{Overwrite, write_atomic};

/// A token as a ceremony file names it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmConfig {
    /// PKCS#11 module path; defaults to the system SoftHSM2.
    pub module: Option<PathBuf>,
    /// Token label.
    pub token_label: String,
    /// File holding the user PIN (mode 0600).
    pub pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    pub pin_env: Option<String>,
}

impl HsmConfig {
    fn token_config(&self, base: &Path) -> anyhow::Result<TokenConfig> {
        let pin = match (&self.pin_file, &self.pin_env) {
            (Some(f), None) => PinSource::File(base.join(f)),
            (None, Some(v)) => PinSource::Env(v.clone()),
            _ => bail!("hsm: set exactly one of pin_file and pin_env"),
        };
        let module = match &self.module {
            Some(m) => base.join(m),
            None => crate::softhsm::module_path()?,
        };
        Ok(TokenConfig {
            module,
            label: self.token_label.clone(),
            pin,
        })
    }

    fn open(&self, base: &Path) -> anyhow::Result<Arc<Token>> {
        let cfg = self.token_config(base)?;
        cfg.open()
            .with_context(|| format!("opening token {:?} in {}", cfg.label, cfg.module.display()))
    }
}

/// A key in a ceremony file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Key label (CKA_LABEL).
    pub label: String,
    /// Algorithm: `ecdsa-p256`, `ecdsa-p384`, `rsa-2048`, `rsa-3072`, `rsa-4096`.
    pub algorithm: Option<String>,
    /// Generate the key (refused if the label exists); otherwise use the existing key.
    #[serde(default)]
    pub generate: bool,
}

/// The certificate a ceremony makes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// Subject, RFC 4514 (`CN=Example Root CA,O=Example`).
    pub subject: String,
    /// Lifetime, e.g. `3650d`.
    pub validity: String,
}

/// `hsmca ceremony root`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootCeremony {
    /// The token of the root key.
    pub hsm: HsmConfig,
    /// The root key.
    pub key: KeyConfig,
    /// The root certificate.
    pub certificate: CertConfig,
    /// Where to write the root certificate (PEM).
    pub output: OutputCert,
}

/// Where a certificate goes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputCert {
    /// The certificate file (PEM), never overwritten.
    pub certificate: PathBuf,
}

/// `hsmca ceremony intermediate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntermediateCeremony {
    /// The issuing (root) side.
    pub issuer: IssuerConfig,
    /// The token of the intermediate key (may be the same token as the root's).
    pub hsm: HsmConfig,
    /// The intermediate key.
    pub key: KeyConfig,
    /// The intermediate certificate.
    pub certificate: CertConfig,
    /// Directory for `root-cert.pem`, `ca-cert.pem` and `cert-chain.pem`.
    pub output: OutputDir,
}

/// The issuer of an intermediate: its token, key and certificate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The issuer's token.
    pub hsm: HsmConfig,
    /// The issuer's key label.
    pub key_label: String,
    /// The issuer's certificate (PEM).
    pub certificate: PathBuf,
}

/// An output directory in Istio's plugged-in layout.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputDir {
    /// The directory.
    pub dir: PathBuf,
}

/// `hsmca ceremony csr`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsrCeremony {
    /// The token.
    pub hsm: HsmConfig,
    /// The key the CSR is for.
    pub key: KeyConfig,
    /// The CSR subject.
    pub csr: CsrConfig,
}

/// A CSR to make.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsrConfig {
    /// Subject, RFC 4514.
    pub subject: String,
    /// Where to write the CSR (PEM).
    pub output: PathBuf,
}

/// `hsmca ceremony import`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportCeremony {
    /// The token holding the key the certificate was issued for.
    pub hsm: HsmConfig,
    /// The key label.
    pub key_label: String,
    /// The signed certificate (PEM).
    pub certificate: PathBuf,
    /// Its issuers up to and including the root (PEM, issuer first, root last).
    pub chain: PathBuf,
    /// Directory for `root-cert.pem`, `ca-cert.pem` and `cert-chain.pem`.
    pub output: OutputDir,
}

fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<(T, PathBuf)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((cfg, base))
}

fn subject(s: &str) -> anyhow::Result<Name> {
    Name::from_str(s).map_err(|e| anyhow::anyhow!("certificate.subject {s:?}: {e}"))
}

fn validity(s: &str) -> anyhow::Result<Duration> {
    hsmca_policy::parse_duration(s).map_err(|e| anyhow::anyhow!("certificate.validity: {e}"))
}

/// Generates the key when asked, with progress on a terminal for slow algorithms.
fn key_for(token: &Arc<Token>, key: &KeyConfig) -> anyhow::Result<()> {
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
        "generated {} key {:?} (CKA_ID {}) in token {:?}: sensitive, never extractable",
        algorithm,
        info.label,
        hex::encode(&info.id),
        token.label()
    );
    Ok(())
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

/// Runs a root ceremony.
pub fn root(config: &Path) -> anyhow::Result<()> {
    let (c, base): (RootCeremony, _) = load(config)?;
    let out = base.join(&c.output.certificate);
    if out.exists() {
        bail!("{} already exists; refusing to overwrite it", out.display());
    }
    let subject = subject(&c.certificate.subject)?;
    let lifetime = validity(&c.certificate.validity)?;
    create_parent(&out)?;
    let token = c.hsm.open(&base)?;
    key_for(&token, &c.key)?;
    let signer = signer(token, &c.key.label)?;
    let root = ca::make_root(&signer, subject, lifetime)?;
    write_atomic(&out, ca::to_pem(&root).as_bytes(), 0o644, Overwrite::Never)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("root certificate: {}", describe(&root));
    println!("wrote {}", out.display());
    Ok(())
}

/// Runs an intermediate ceremony.
pub fn intermediate(config: &Path) -> anyhow::Result<()> {
    let (c, base): (IntermediateCeremony, _) = load(config)?;
    let out = base.join(&c.output.dir);
    let subject = subject(&c.certificate.subject)?;
    let lifetime = validity(&c.certificate.validity)?;
    let issuer_chain = ca::read_pem_certs(&base.join(&c.issuer.certificate))?;
    let issuer_cert = issuer_chain[0].clone();
    for name in [CaFiles::ROOT, CaFiles::CA, CaFiles::CHAIN] {
        if out.join(name).exists() {
            bail!(
                "{} already exists; refusing to overwrite it",
                out.join(name).display()
            );
        }
    }
    let issuer_token = c.issuer.hsm.open(&base)?;
    let issuer_signer = signer(issuer_token, &c.issuer.key_label)?;
    if issuer_signer.public_key() != &ca::cert_public_key(&issuer_cert)? {
        bail!(
            "issuer key {:?} is not the key of {}",
            c.issuer.key_label,
            c.issuer.certificate.display()
        );
    }
    let token = c.hsm.open(&base)?;
    key_for(&token, &c.key)?;
    let key = token.public_key(&c.key.label)?;
    // The new key must be a protected CA key that signs.
    signer(token, &c.key.label)?;
    let cert = ca::make_intermediate(&issuer_signer, &issuer_cert, key, subject, lifetime)?;
    let files = CaFiles {
        ca_cert: cert,
        chain_above: issuer_chain,
    };
    ca::verify_chain(&files.full_chain(), SystemTime::now())?;
    std::fs::create_dir_all(&out)?;
    files.write(&out)?;
    println!("intermediate certificate: {}", describe(&files.ca_cert));
    println!(
        "wrote {}/{{root-cert.pem,ca-cert.pem,cert-chain.pem}}",
        out.display()
    );
    Ok(())
}

/// Runs a CSR ceremony.
pub fn csr(config: &Path) -> anyhow::Result<()> {
    let (c, base): (CsrCeremony, _) = load(config)?;
    let out = base.join(&c.csr.output);
    if out.exists() {
        bail!("{} already exists; refusing to overwrite it", out.display());
    }
    let subject = subject(&c.csr.subject)?;
    create_parent(&out)?;
    let token = c.hsm.open(&base)?;
    key_for(&token, &c.key)?;
    let signer = signer(token, &c.key.label)?;
    let req = ca::make_csr(&signer, subject)?;
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
    let (c, base): (ImportCeremony, _) = load(config)?;
    let out = base.join(&c.output.dir);
    let cert = ca::read_pem_certs(&base.join(&c.certificate))?.remove(0);
    let chain = ca::read_pem_certs(&base.join(&c.chain))?;
    let token = c.hsm.open(&base)?;
    let signer = signer(token, &c.key_label)?;
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
}
