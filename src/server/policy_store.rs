//! The policy in force, reloaded when its file changes (polled) or on SIGHUP, without
//! dropping requests. A bad new file keeps the old policy and says why.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use hsmca_policy::Policy;

/// The current policy and where it comes from.
pub struct PolicyStore {
    current: RwLock<Arc<Policy>>,
    source: Option<PathBuf>,
}

impl PolicyStore {
    /// A store holding a fixed policy (the built-in default).
    pub fn fixed(policy: Policy) -> Self {
        PolicyStore {
            current: RwLock::new(Arc::new(policy)),
            source: None,
        }
    }

    /// Loads the policy file; `trust_domain` must match the server's.
    pub fn from_file(path: PathBuf, trust_domain: &str) -> anyhow::Result<Self> {
        let policy = load(&path, trust_domain)?;
        Ok(PolicyStore {
            current: RwLock::new(Arc::new(policy)),
            source: Some(path),
        })
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the file; on error the old policy stays and the error is returned.
    pub fn reload(&self, trust_domain: &str) -> anyhow::Result<bool> {
        let Some(path) = &self.source else {
            return Ok(false);
        };
        let policy = load(path, trust_domain)?;
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.version_hash == policy.version_hash {
            return Ok(false);
        }
        *current = Arc::new(policy);
        Ok(true)
    }

    /// Watches the file (every second, by modification time; a reload that finds the same
    /// content changes nothing) and SIGHUP. Without a policy file, SIGHUP is logged and ignored.
    pub fn watch(self: &Arc<Self>, trust_domain: String) {
        let Some(path) = self.source.clone() else {
            #[cfg(unix)]
            if let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        tracing::info!(
                            "SIGHUP: no policy file to reload (the built-in policy is in force)"
                        );
                    }
                });
            }
            return;
        };
        let store = self.clone();
        tokio::spawn(async move {
            let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut seen: Option<SystemTime> = mtime(&path);
            #[cfg(unix)]
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let forced = match hup.as_mut() {
                    Some(h) => tokio::select! {
                        _ = h.recv() => true,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                    },
                    None => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        false
                    }
                };
                #[cfg(not(unix))]
                let forced = {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    false
                };
                let now = mtime(&path);
                if !forced && now == seen {
                    continue;
                }
                seen = now;
                match store.reload(&trust_domain) {
                    Ok(true) => tracing::info!(
                        file = %path.display(),
                        version = %store.current().version_hash,
                        "policy reloaded"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "policy file is invalid; the previous policy stays in force"
                    ),
                }
            }
        });
    }
}

fn load(path: &PathBuf, trust_domain: &str) -> anyhow::Result<Policy> {
    let text =
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let policy = Policy::parse(&path.display().to_string(), &text)?;
    if policy.trust_domain != trust_domain {
        anyhow::bail!(
            "{}: trust_domain {:?} differs from the server's {:?}",
            path.display(),
            policy.trust_domain,
            trust_domain
        );
    }
    Ok(policy)
}
