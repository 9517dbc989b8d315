//! The ceremony files: one TOML table per ceremony, checked when read.

use super::*;

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
    pub(super) fn token_config(&self, base: &Path) -> anyhow::Result<TokenConfig> {
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

    pub(super) fn open(&self, base: &Path) -> anyhow::Result<Arc<Token>> {
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
    /// The audit log recording the ceremony (strongly recommended).
    pub audit: Option<AuditConfig>,
}

/// The `[audit]` table of a ceremony: the audit log that records every action of the ceremony,
/// sealed by an audit key in the ceremony's `[hsm]` token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit log directory (created when missing; an existing log is continued, and must
    /// verify with the audit key).
    pub dir: PathBuf,
    /// Label of the audit key in the ceremony's `[hsm]` token (for an intermediate ceremony,
    /// the token of the new intermediate key). It must not be a CA key of the ceremony.
    pub key_label: String,
    /// Generate the audit key (ECDSA P-256) when the token has no key of that label and the
    /// public key file does not exist yet. Without it, a missing audit key fails the ceremony.
    #[serde(default)]
    pub generate_key: bool,
    /// The audit public key (PEM), for `hsmca audit verify --key`: written when missing,
    /// otherwise it must be the token's audit key. Default: `audit-key.pem` in the directory
    /// above `dir`, where `hsmca audit verify DIR` looks for it.
    pub public_key: Option<PathBuf>,
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
    /// The audit log recording the ceremony; its key is in the `[hsm]` token.
    pub audit: Option<AuditConfig>,
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
    /// The audit log recording the ceremony.
    pub audit: Option<AuditConfig>,
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
    /// The audit log recording the ceremony.
    pub audit: Option<AuditConfig>,
}

/// Reads a ceremony file: its content, the directory its paths are relative to, and the
/// SHA-256 of its text (recorded in the audit log).
pub(super) fn load<T: for<'de> Deserialize<'de>>(
    path: &Path,
) -> anyhow::Result<(T, PathBuf, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((cfg, base, sha256_hex(text.as_bytes())))
}

pub(super) fn subject(s: &str) -> anyhow::Result<Name> {
    Name::from_str(s).map_err(|e| anyhow::anyhow!("certificate.subject {s:?}: {e}"))
}

pub(super) fn validity(s: &str) -> anyhow::Result<Duration> {
    hsmca_policy::parse_duration(s).map_err(|e| anyhow::anyhow!("certificate.validity: {e}"))
}
