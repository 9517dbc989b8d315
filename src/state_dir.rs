//! The embedded default: a state directory holding an isolated SoftHSM2 token with a P-256
//! root and intermediate, the PIN, and the CA files.
//!
//! ```text
//! DIR/softhsm2.conf   SoftHSM configuration (tokens in DIR/tokens)
//! DIR/tokens/         the token
//! DIR/hsm-pin         the user PIN, mode 0600
//! DIR/root-cert.pem   DIR/ca-cert.pem   DIR/cert-chain.pem
//! DIR/audit-key.pem   the audit public key
//! DIR/audit/          the audit log: init's key ceremony, then what `hsmca dev` decides
//! ```
//!
//! `init` builds everything in `DIR/.init-staging` and moves it into place only when all of it
//! succeeded; `cert-chain.pem` is moved last, so a crash leaves either nothing or the staging
//! directory, which the next `init` discards. State directories made by earlier versions have
//! no `audit-key.pem` and no `audit/`: `hsmca dev` creates them.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use hsmca_hsm::{HsmSigner, KeyAlgorithm, Module, Pin, PinSource, SignerOptions, TokenConfig};
use rand::RngExt;
use x509_cert::name::Name;

use crate::ca::{self, CaFiles};
use crate::ceremony::CeremonyLog;
use crate::files::Overwrite;
use crate::softhsm;

/// Token label of the embedded default.
pub const TOKEN_LABEL: &str = "hsmca";
/// Key label of the root key.
pub const ROOT_KEY: &str = "hsmca-root";
/// Key label of the intermediate (signing) key.
pub const INTERMEDIATE_KEY: &str = "hsmca-intermediate";
/// Key label of the audit key (seals the audit log's checkpoints).
pub const AUDIT_KEY: &str = "hsmca-audit";
/// The audit public key, next to the root.
pub const AUDIT_KEY_PEM: &str = "audit-key.pem";
/// The audit log directory.
pub const AUDIT_DIR: &str = "audit";
/// Root lifetime: 10 years.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(3650 * 86_400);
/// Intermediate lifetime: 3 years (never beyond the root's).
pub const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(3 * 365 * 86_400);

const STAGING: &str = ".init-staging";
const STAGE_ENV: &str = "HSMCA_INIT_STAGING";

/// A state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// What `init` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitOutcome {
    /// A token and CA were created.
    Created,
    /// The directory was already initialised; nothing changed.
    AlreadyInitialised,
}

impl StateDir {
    /// The state directory at `path` (made absolute: the SoftHSM configuration names the
    /// token directory by absolute path, so the state works from any working directory).
    pub fn new(path: &Path) -> Self {
        StateDir {
            root: std::path::absolute(path).unwrap_or_else(|_| path.to_owned()),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }
    /// `DIR/softhsm2.conf`.
    pub fn conf(&self) -> PathBuf {
        self.root.join("softhsm2.conf")
    }
    /// `DIR/tokens`.
    pub fn token_dir(&self) -> PathBuf {
        self.root.join("tokens")
    }
    /// `DIR/audit`.
    pub fn audit_dir(&self) -> PathBuf {
        self.root.join(AUDIT_DIR)
    }

    /// Creates the audit key and `DIR/audit-key.pem` when a state directory made by an
    /// earlier version lacks them (needs `SOFTHSM2_CONF` set to this directory).
    pub fn ensure_audit_key(&self) -> anyhow::Result<()> {
        let pem = self.root.join(AUDIT_KEY_PEM);
        if pem.exists() {
            return Ok(());
        }
        let token = self.token_config()?.open()?;
        if token.key_info(AUDIT_KEY).is_err() {
            token.generate_key(AUDIT_KEY, KeyAlgorithm::EcdsaP256)?;
            tracing::info!(key = AUDIT_KEY, "generated the audit key");
        }
        write_public_key_pem(&pem, &token.public_key(AUDIT_KEY)?)
    }

    /// `DIR/hsm-pin`.
    pub fn pin_file(&self) -> PathBuf {
        self.root.join("hsm-pin")
    }

    fn members(&self) -> Vec<PathBuf> {
        vec![
            self.conf(),
            self.token_dir(),
            self.pin_file(),
            self.root.join(CaFiles::ROOT),
            self.root.join(CaFiles::CA),
            self.root.join(CaFiles::CHAIN),
        ]
    }

    /// What `init` would create: the members, and the audit public key and log, which an
    /// initialised directory may lack (made by an earlier version) but which `init` must never
    /// replace (a rename over them would silently discard someone's key or log).
    fn created_by_init(&self) -> Vec<PathBuf> {
        let mut all = self.members();
        all.extend([self.root.join(AUDIT_KEY_PEM), self.audit_dir()]);
        all
    }

    /// True when every file of an initialised state directory is present.
    pub fn is_initialised(&self) -> bool {
        self.members().iter().all(|p| p.exists())
    }

    /// The token of this state directory (module from the system, PIN from `DIR/hsm-pin`).
    pub fn token_config(&self) -> anyhow::Result<TokenConfig> {
        Ok(TokenConfig {
            module: softhsm::module_path()?,
            label: TOKEN_LABEL.into(),
            pin: PinSource::File(self.pin_file()),
        })
    }

    /// Makes sure this process runs with `SOFTHSM2_CONF` set to this directory's configuration;
    /// otherwise replaces this process with the same command run with it, so that signals
    /// reach the process doing the work (returns only on error).
    pub fn ensure_conf_env(&self) -> anyhow::Result<()> {
        if !self.conf().is_file() {
            bail!(
                "{} is not an initialised hsmca state directory (no softhsm2.conf); run \
                 `hsmca init --state-dir {}` first",
                self.root.display(),
                self.root.display()
            );
        }
        if softhsm::env_points_at(&self.conf()) {
            return Ok(());
        }
        Err(softhsm::exec_with_conf(&self.conf()))
    }

    /// `hsmca init`: create the token, keys and CA files, or do nothing when they exist.
    /// Returns the exit code of the work (the token part runs in a child process).
    pub fn init(&self, trust_domain: &str) -> anyhow::Result<InitOutcome> {
        if let Some(stage) = std::env::var_os(STAGE_ENV) {
            // We are the child: SOFTHSM2_CONF points at the staging configuration.
            create_token_and_ca(Path::new(&stage), trust_domain)?;
            return Ok(InitOutcome::Created);
        }
        if self.is_initialised() {
            return Ok(InitOutcome::AlreadyInitialised);
        }
        let present: Vec<_> = self
            .created_by_init()
            .into_iter()
            .filter(|p| p.exists())
            .collect();
        if !present.is_empty() {
            bail!(
                "{} holds part of an hsmca state ({}) but not all of it; refusing to touch it. \
                 Move it away or finish it by hand",
                self.root.display(),
                present
                    .iter()
                    .map(|p| p
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let module = softhsm::module_path()?;
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        let stage = self.root.join(STAGING);
        if stage.exists() {
            std::fs::remove_dir_all(&stage)
                .with_context(|| format!("removing the stale {}", stage.display()))?;
        }
        std::fs::create_dir(&stage).with_context(|| format!("creating {}", stage.display()))?;
        let result = self.stage_and_commit(&stage, &module);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&stage);
        }
        result.map(|()| InitOutcome::Created)
    }

    fn stage_and_commit(&self, stage: &Path, module: &Path) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))?;
        std::fs::create_dir(stage.join("tokens"))?;
        let conf = stage.join("softhsm2.conf");
        softhsm::write_config(&conf, &stage.join("tokens"), Overwrite::Never)?;
        crate::files::write_atomic(
            &stage.join("hsm-pin"),
            format!("{}\n", random_pin()).as_bytes(),
            0o600,
            Overwrite::Never,
        )?;
        tracing::debug!(module = %module.display(), "creating the token in a child process");
        let code = softhsm::rerun_with_conf(&conf, &[(STAGE_ENV, &stage.to_string_lossy())])?;
        if code != 0 {
            bail!("creating the token and CA failed (see above); nothing was changed");
        }
        // Commit: the token, its configuration and PIN, the audit key and log, then the CA
        // files, cert-chain.pem last.
        std::fs::rename(stage.join("tokens"), self.token_dir())?;
        softhsm::write_config(&self.conf(), &self.token_dir(), Overwrite::Never)?;
        std::fs::rename(stage.join("hsm-pin"), self.pin_file())?;
        for name in [
            AUDIT_KEY_PEM,
            AUDIT_DIR,
            CaFiles::ROOT,
            CaFiles::CA,
            CaFiles::CHAIN,
        ] {
            std::fs::rename(stage.join(name), self.root.join(name))?;
        }
        std::fs::File::open(&self.root)?.sync_all()?;
        std::fs::remove_dir_all(stage)?;
        Ok(())
    }
}

/// Writes a public key as PEM (`PUBLIC KEY`), never overwriting.
pub fn write_public_key_pem(path: &Path, key: &hsmca_hsm::PublicKey) -> anyhow::Result<()> {
    let pem = der::pem::encode_string("PUBLIC KEY", der::pem::LineEnding::LF, key.spki_der())
        .map_err(|e| anyhow::anyhow!("encoding the public key: {e}"))?;
    crate::files::write_atomic(path, pem.as_bytes(), 0o644, Overwrite::Never)
        .with_context(|| format!("writing {}", path.display()))
}

fn random_pin() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// In the child: make the token, the three keys and both certificates inside `stage`, each
/// action recorded in the audit log `stage/audit`, sealed by the audit key (made first, so
/// that it can record the others as they happen).
fn create_token_and_ca(stage: &Path, trust_domain: &str) -> anyhow::Result<()> {
    let module = Module::load(&softhsm::module_path()?)?;
    let pin = PinSource::File(stage.join("hsm-pin")).read()?;
    let so_pin = Pin::new(random_pin());
    module.init_token(TOKEN_LABEL, &so_pin, &pin)?;
    let token = module.open_token(TOKEN_LABEL, pin)?;
    let algorithm = KeyAlgorithm::EcdsaP256;
    let audit_key = token.generate_key(AUDIT_KEY, algorithm)?;
    write_public_key_pem(&stage.join(AUDIT_KEY_PEM), &token.public_key(AUDIT_KEY)?)?;
    let options = SignerOptions {
        sessions: 1,
        allow_insecure_key: false,
    };
    let audit_dir = stage.join(AUDIT_DIR);
    let log = CeremonyLog::open(
        &audit_dir,
        HsmSigner::open(token.clone(), AUDIT_KEY, &options)?,
        "hsmca init",
    )?;
    let result = (|| {
        log.key_generated(&token, algorithm, &audit_key)?;
        for label in [ROOT_KEY, INTERMEDIATE_KEY] {
            let info = token.generate_key(label, algorithm)?;
            log.key_generated(&token, algorithm, &info)?;
        }
        let root_signer = HsmSigner::open(token.clone(), ROOT_KEY, &options)?;
        let intermediate_key = token.public_key(INTERMEDIATE_KEY)?;
        let root_subject = Name::from_str(&format!("O={trust_domain}"))
            .with_context(|| format!("trust domain {trust_domain:?} is not a valid name"))?;
        let root = ca::make_root(&root_signer, root_subject, ROOT_LIFETIME)?;
        log.certificate(
            format!(
                "signed root certificate {:?} with key {ROOT_KEY:?} in token {TOKEN_LABEL:?}",
                root.tbs_certificate().subject().to_string()
            ),
            &root,
        )?;
        let intermediate_subject =
            Name::from_str(&format!("CN=hsmca intermediate CA,O={trust_domain}"))?;
        let intermediate = ca::make_intermediate(
            &root_signer,
            &root,
            intermediate_key,
            intermediate_subject,
            INTERMEDIATE_LIFETIME,
        )?;
        // The intermediate key must sign too, before anyone relies on it.
        HsmSigner::open(token.clone(), INTERMEDIATE_KEY, &options)?;
        log.certificate(
            format!(
                "signed intermediate certificate {:?} for key {INTERMEDIATE_KEY:?} with key \
                 {ROOT_KEY:?} in token {TOKEN_LABEL:?}",
                intermediate.tbs_certificate().subject().to_string()
            ),
            &intermediate,
        )?;
        CaFiles {
            ca_cert: intermediate,
            chain_above: vec![root],
        }
        .write(stage)?;
        Ok(())
    })();
    log.finish(result)?;
    // The log's files are in place before the parent moves the directory.
    std::fs::File::open(&audit_dir)?.sync_all()?;
    Ok(())
}
