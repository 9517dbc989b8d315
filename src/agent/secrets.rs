//! The workload certificate and trust bundle: fetched from the CA, kept fresh, and published to
//! every SDS stream through watch channels. When the CA is down, the current certificate is kept
//! and the agent retries with backoff until it can renew.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use zeroize::Zeroizing;

use super::ca_client::{CaClientConfig, create_certificate};
use super::workload_key::{WorkloadKeyType, generate};
use crate::files::{Overwrite, write_atomic};

/// The workload's certificate and key.
pub struct WorkloadSecret {
    /// The whole chain from the CA, concatenated (leaf first, root included), as Istio serves it.
    pub chain_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: Zeroizing<String>,
    /// The leaf's serial, hex.
    pub serial: String,
    /// When it was received.
    pub received: SystemTime,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSecret")
            .field("serial", &self.serial)
            .field("key_pem", &"...")
            .finish()
    }
}

/// What the agent asks for and how it rotates.
#[derive(Debug, Clone)]
pub struct SecretSettings {
    /// The SPIFFE ID put in the CSR.
    pub spiffe_id: String,
    /// Key type.
    pub key_type: WorkloadKeyType,
    /// Requested lifetime (`SECRET_TTL`).
    pub ttl: Duration,
    /// Renew when this fraction of the lifetime has passed (`SECRET_GRACE_PERIOD_RATIO`).
    pub grace_ratio: f64,
    /// Extra trust anchors (PEM) merged into ROOTCA.
    pub extra_roots: Vec<String>,
    /// Write key.pem, cert-chain.pem, root-cert.pem here (for applications without SDS).
    pub output_dir: Option<PathBuf>,
}

/// The published secrets.
#[derive(Clone)]
pub struct Secrets {
    /// `default`.
    pub workload: watch::Receiver<Option<Arc<WorkloadSecret>>>,
    /// `ROOTCA`: the trust bundle (PEM).
    pub roots: watch::Receiver<Option<Arc<String>>>,
}

/// Starts the fetch-and-rotate loop; returns the receivers the SDS server reads.
pub fn start(ca: CaClientConfig, settings: SecretSettings) -> Secrets {
    let (workload_tx, workload) = watch::channel(None);
    let (roots_tx, roots) = watch::channel(None);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(500);
        loop {
            let current = workload_tx.borrow().clone();
            match fetch(&ca, &settings).await {
                Ok((secret, bundle)) => {
                    backoff = Duration::from_millis(500);
                    if let Some(dir) = &settings.output_dir
                        && let Err(e) = write_output(dir, &secret, &bundle)
                    {
                        tracing::error!(dir = %dir.display(), error = %e, "writing the output certificates failed");
                    }
                    tracing::info!(serial = %secret.serial, identity = %settings.spiffe_id, "workload certificate issued");
                    let delay = rotate_after(&secret, settings.grace_ratio);
                    workload_tx.send_replace(Some(Arc::new(secret)));
                    roots_tx.send_if_modified(|r| {
                        if r.as_deref() == Some(&bundle) {
                            false
                        } else {
                            *r = Some(Arc::new(bundle));
                            true
                        }
                    });
                    tracing::debug!(seconds = delay.as_secs(), "next rotation");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    let left = current
                        .as_ref()
                        .and_then(|c| c.not_after.duration_since(SystemTime::now()).ok());
                    match left {
                        Some(left) => {
                            tracing::warn!(error = %e, seconds_left = left.as_secs(), retry_in_ms = backoff.as_millis() as u64, "renewal failed; serving the current certificate")
                        }
                        None => {
                            tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "no valid workload certificate; retrying")
                        }
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    });
    Secrets { workload, roots }
}

/// Istio's rotation time: after `ratio ± 1%` of the lifetime since it was received.
fn rotate_after(secret: &WorkloadSecret, ratio: f64) -> Duration {
    let life = secret
        .not_after
        .duration_since(secret.received)
        .unwrap_or_default();
    let jitter = (rand::random::<f64>() - 0.5) * 0.02;
    let at = life.mul_f64((ratio + jitter).clamp(0.0, 1.0));
    let elapsed = secret.received.elapsed().unwrap_or_default();
    at.saturating_sub(elapsed).max(Duration::from_secs(1))
}

async fn fetch(
    ca: &CaClientConfig,
    s: &SecretSettings,
) -> anyhow::Result<(WorkloadSecret, String)> {
    let (kind, id) = (s.key_type, s.spiffe_id.clone());
    let key = tokio::task::spawn_blocking(move || generate(kind, &id)).await??;
    let chain = create_certificate(ca, &key.csr_pem, s.ttl)
        .await
        .map_err(|st| anyhow::anyhow!("CreateCertificate: {:?}: {}", st.code(), st.message()))?;
    let leaf = <x509_cert::Certificate as der::DecodePem>::from_pem(chain[0].as_bytes())
        .map_err(|e| anyhow::anyhow!("the CA returned an unreadable leaf: {e}"))?;
    let not_after = leaf.tbs_certificate().validity().not_after.to_system_time();
    let serial = crate::issuance::serial_hex(leaf.tbs_certificate().serial_number());
    let mut roots: Vec<String> = vec![normalise(chain.last().expect("at least two"))];
    for extra in &s.extra_roots {
        roots.push(normalise(extra));
    }
    roots.sort();
    roots.dedup();
    let chain_pem: String = chain.iter().map(|c| normalise(c)).collect();
    Ok((
        WorkloadSecret {
            chain_pem,
            key_pem: key.key_pem,
            serial,
            received: SystemTime::now(),
            not_after,
        },
        roots.concat(),
    ))
}

fn normalise(pem: &str) -> String {
    let t = pem.trim();
    format!("{t}\n")
}

/// Writes key.pem, cert-chain.pem and root-cert.pem so that a reader never sees a key and a
/// chain that do not belong together (Kubernetes' atomic-writer layout): the three files go into
/// a new versioned directory, `..data` is switched to it with one rename, and the file names
/// are symbolic links through `..data`.
fn write_output(
    dir: &std::path::Path,
    secret: &WorkloadSecret,
    roots: &str,
) -> std::io::Result<()> {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(dir)?;
    let version = format!("..{}-{:08x}", secret.serial, rand::random::<u32>());
    let vdir = dir.join(&version);
    std::fs::create_dir(&vdir)?;
    write_atomic(
        &vdir.join("key.pem"),
        secret.key_pem.as_bytes(),
        0o600,
        Overwrite::Never,
    )?;
    write_atomic(
        &vdir.join("cert-chain.pem"),
        secret.chain_pem.as_bytes(),
        0o644,
        Overwrite::Never,
    )?;
    write_atomic(
        &vdir.join("root-cert.pem"),
        roots.as_bytes(),
        0o644,
        Overwrite::Never,
    )?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&version, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for name in ["key.pem", "cert-chain.pem", "root-cert.pem"] {
        let link = dir.join(name);
        let is_link = std::fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            let tmp = dir.join(format!(".{name}.link"));
            let _ = std::fs::remove_file(&tmp);
            symlink(format!("..data/{name}"), &tmp)?;
            std::fs::rename(&tmp, &link)?;
        }
    }
    std::fs::File::open(dir)?.sync_all()?;
    // Older versions are no longer reachable.
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("..")
            && name != "..data"
            && name != version.as_str()
            && entry.path().is_dir()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}
