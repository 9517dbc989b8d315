//! The node agent (pilot-agent's half): serves Envoy's SDS over a Unix socket, makes the
//! workload key and CSR, gets the certificate from the CA, rotates it before expiry and pushes
//! it to every Envoy stream, and serves the root as `ROOTCA`.

pub mod ca_client;
pub mod sds;
pub mod secrets;
pub mod stream_state;
pub mod workload_key;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;

pub use workload_key::WorkloadKeyType;

/// Everything `hsmca agent` needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `CA_ADDR`.
    pub ca_addr: String,
    /// `CA_ROOT_CA`: the root the CA's serving certificate chains to.
    pub ca_root: PathBuf,
    /// Projected service-account token file.
    pub token_file: Option<PathBuf>,
    /// The Unix socket Envoy connects to.
    pub sds_socket: PathBuf,
    /// `TRUST_DOMAIN`.
    pub trust_domain: String,
    /// `POD_NAMESPACE`.
    pub namespace: String,
    /// `SERVICE_ACCOUNT`.
    pub service_account: String,
    /// Workload key type.
    pub key_type: WorkloadKeyType,
    /// `SECRET_TTL`.
    pub ttl: Duration,
    /// `SECRET_GRACE_PERIOD_RATIO`.
    pub grace_ratio: f64,
    /// `ISTIO_META_CLUSTER_ID`.
    pub cluster_id: Option<String>,
    /// Extra trust anchors (PEM files).
    pub extra_roots: Vec<PathBuf>,
    /// `--output-certs` / `OUTPUT_CERTS`.
    pub output_certs: Option<PathBuf>,
}

/// Runs the agent until SIGINT/SIGTERM.
pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let root_pem = std::fs::read_to_string(&cfg.ca_root)
        .with_context(|| format!("reading the CA root {}", cfg.ca_root.display()))?;
    let mut extra_roots = Vec::new();
    for p in &cfg.extra_roots {
        extra_roots.push(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading trust anchor {}", p.display()))?,
        );
    }
    let spiffe_id =
        hsmca_policy::SpiffeId::workload(&cfg.trust_domain, &cfg.namespace, &cfg.service_account)
            .context("the workload identity")?
            .to_string();
    let secrets = secrets::start(
        ca_client::CaClientConfig {
            addr: cfg.ca_addr.clone(),
            root_pem,
            token_file: cfg.token_file.clone(),
            cluster_id: cfg.cluster_id.clone(),
        },
        secrets::SecretSettings {
            spiffe_id: spiffe_id.clone(),
            key_type: cfg.key_type,
            ttl: cfg.ttl,
            grace_ratio: cfg.grace_ratio,
            extra_roots,
            output_dir: cfg.output_certs.clone(),
        },
    );
    if let Some(parent) = cfg
        .sds_socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if cfg.sds_socket.exists() {
        // A socket left by a previous run: refuse to steal one that answers.
        if std::os::unix::net::UnixStream::connect(&cfg.sds_socket).is_ok() {
            anyhow::bail!("{} is served by another process", cfg.sds_socket.display());
        }
        std::fs::remove_file(&cfg.sds_socket)
            .with_context(|| format!("removing the stale {}", cfg.sds_socket.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(&cfg.sds_socket)
        .with_context(|| format!("listening on {}", cfg.sds_socket.display()))?;
    tracing::info!(socket = %cfg.sds_socket.display(), identity = %spiffe_id, ca = %cfg.ca_addr, "serving SDS");
    println!(
        "hsmca agent: serving SDS on {} for {spiffe_id}",
        cfg.sds_socket.display()
    );
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let socket = cfg.sds_socket.clone();
    // On SIGTERM every SDS stream is ended, so the graceful shutdown does not wait for Envoys
    // that keep their streams open; a last deadline bounds it anyway.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tonic::transport::Server::builder()
        .add_service(SecretDiscoveryServiceServer::new(sds::SdsService::new(
            secrets,
            stop_rx.clone(),
        )))
        .serve_with_incoming_shutdown(incoming, async move {
            crate::server::shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
    let mut stopped = stop_rx;
    tokio::select! {
        result = server => result?,
        _ = async {
            let _ = stopped.changed().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        } => tracing::warn!("SDS streams did not close within 5s of the stop signal; exiting"),
    }
    let _ = std::fs::remove_file(socket);
    tracing::info!("agent stopped");
    Ok(())
}
