//! The Istio CA server: `IstioCertificateService` over TLS (and, only when asked, plaintext for
//! local debugging), gRPC health, and Prometheus metrics.

pub mod config;
pub mod metrics;
pub mod policy_store;
pub mod rate_limit;
pub mod service;
pub mod tls;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use anyhow::Context;
use hsmca_hsm::{HsmSigner, SignerOptions};
use hsmca_proto::IstioCertificateServiceServer;
use tokio::net::TcpListener;

use crate::authn::{
    Authenticators, ClientCertAuthenticator, JwtAuthenticator, KubeJwtAuthenticator,
    KubeJwtSettings,
};
use crate::ca::CaFiles;
use crate::issuance::{WorkloadCa, WorkloadSettings};
pub use config::{KubeSource, Settings};

/// The largest gRPC message accepted (a CSR is small).
const MAX_MESSAGE: usize = 256 * 1024;

async fn kube_client(source: &KubeSource) -> anyhow::Result<kube::Client> {
    let config = match source {
        KubeSource::File(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        KubeSource::Infer => kube::Config::infer()
            .await
            .context("no Kubernetes configuration found (KUBECONFIG or in-cluster)")?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// Opens the token and CA files and builds the workload CA (blocking work off the runtime).
pub async fn open_ca(settings: &Settings) -> anyhow::Result<Arc<WorkloadCa>> {
    let s = settings.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Arc<WorkloadCa>> {
        let token = s.token.open().with_context(|| {
            format!(
                "opening token {:?} in {}",
                s.token.label,
                s.token.module.display()
            )
        })?;
        let signer = HsmSigner::open(
            token,
            &s.key_label,
            &SignerOptions {
                sessions: s.sessions,
                allow_insecure_key: s.allow_insecure_key,
            },
        )
        .with_context(|| format!("opening signing key {:?}", s.key_label))?;
        let files = CaFiles::load(&s.ca_dir)
            .with_context(|| format!("loading the CA files in {}", s.ca_dir.display()))?;
        let ca = WorkloadCa::new(
            Arc::new(signer),
            files,
            WorkloadSettings {
                trust_domain: s.trust_domain.clone(),
            },
        )?;
        Ok(Arc::new(ca))
    })
    .await?
}

/// Opens the audit log, sealed by the audit key in the CA's token, and records the start.
async fn open_audit(
    settings: &Settings,
    ca: &WorkloadCa,
    policy_version: &str,
) -> anyhow::Result<Option<Arc<crate::audit::AuditLog>>> {
    let Some(a) = settings.audit.clone() else {
        tracing::warn!("AUDIT LOG DISABLED: certificates are issued without a record");
        return Ok(None);
    };
    let token = settings.token.clone();
    let signing_key = settings.key_label.clone();
    let policy_version = policy_version.to_owned();
    let serial = crate::issuance::serial_hex(ca.files().ca_cert.tbs_certificate().serial_number());
    tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Arc<crate::audit::AuditLog>>> {
        let token = token.open()?;
        let sealer = HsmSigner::open(token, &a.key_label, &SignerOptions { sessions: 1, allow_insecure_key: false })
            .with_context(|| format!("opening audit key {:?}", a.key_label))?;
        let log = crate::audit::AuditLog::open(&a.dir, Some(Arc::new(sealer)), a.options.clone())
            .with_context(|| format!("opening the audit log in {}", a.dir.display()))?;
        log.append_durable_blocking(crate::audit::Record {
            kind: crate::audit::Kind::Start,
            reason: Some(format!(
                "hsmca {} started; signing key {signing_key:?} (certificate serial {serial}); policy {policy_version}",
                env!("CARGO_PKG_VERSION")
            )),
            policy_version: Some(policy_version),
            ..Default::default()
        })?;
        Ok(Some(Arc::new(log)))
    })
    .await?
}

/// Signs a probe every two seconds: health turns NOT_SERVING while the HSM cannot sign, and
/// back to SERVING when it can (the probe also drives the reconnection to a network HSM).
async fn probe_hsm(ca: Arc<WorkloadCa>, health: tonic_health::server::HealthReporter) {
    let mut serving = true;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let signer = ca.signer().clone();
        let probe = tokio::task::spawn_blocking(move || signer.sign(b"hsmca health probe").is_ok());
        let ok = matches!(
            tokio::time::timeout(service::HSM_DEADLINE, probe).await,
            Ok(Ok(true))
        );
        if ok != serving {
            serving = ok;
            if ok {
                tracing::info!("the HSM signs again: serving");
                health
                    .set_serving::<IstioCertificateServiceServer<service::CaService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
            } else {
                tracing::error!("the HSM cannot sign: health is NOT_SERVING");
                health
                    .set_not_serving::<IstioCertificateServiceServer<service::CaService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
            }
        }
    }
}

/// The policy in force: the file when one is configured, else Istio's behaviour.
pub fn policy_store(settings: &Settings) -> anyhow::Result<policy_store::PolicyStore> {
    match &settings.policy {
        Some(path) => policy_store::PolicyStore::from_file(path.clone(), &settings.trust_domain),
        None => Ok(policy_store::PolicyStore::fixed(
            hsmca_policy::Policy::istio_default(
                &settings.trust_domain,
                settings.default_ttl,
                settings.max_ttl,
            )?,
        )),
    }
}

/// Runs the server until SIGINT/SIGTERM, then lets in-flight requests finish.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let policy = Arc::new(policy_store(&settings)?);
    let ca = open_ca(&settings).await?;
    let audit = open_audit(&settings, &ca, &policy.current().version_hash).await?;
    let metrics = Arc::new(metrics::Metrics::default());
    let unix = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    metrics.root_cert_expiry.store(
        unix(
            ca.files()
                .root()
                .tbs_certificate()
                .validity()
                .not_after
                .to_system_time(),
        ),
        Ordering::Relaxed,
    );
    metrics.cert_chain_expiry.store(
        unix(
            ca.files()
                .ca_cert
                .tbs_certificate()
                .validity()
                .not_after
                .to_system_time(),
        ),
        Ordering::Relaxed,
    );

    let kube = match &settings.kube {
        None => None,
        Some(source) => {
            let local = match kube_client(source).await {
                Ok(c) => Some(c),
                Err(e) if settings.clusters.is_empty() => {
                    return Err(e.context("the Kubernetes JWT authenticator is enabled"));
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "no local Kubernetes API; only the configured remote clusters are used");
                    None
                }
            };
            let mut remote = HashMap::new();
            for (id, path) in &settings.clusters {
                remote.insert(
                    id.clone(),
                    kube_client(&KubeSource::File(path.clone()))
                        .await
                        .with_context(|| format!("cluster {id:?}"))?,
                );
            }
            Some(KubeJwtAuthenticator::new(KubeJwtSettings {
                audiences: settings.audiences.clone(),
                local_cluster: settings.cluster_id.clone(),
                local,
                remote,
                trust_domain: settings.trust_domain.clone(),
                cache_ttl: settings.token_review_cache,
            }))
        }
    };
    let jwt = if settings.jwt_rules.is_empty() {
        None
    } else {
        Some(JwtAuthenticator::new(
            settings.jwt_rules.clone(),
            &settings.trust_domain,
        )?)
    };
    let authn = Arc::new(Authenticators::new(
        settings
            .client_cert
            .then(|| ClientCertAuthenticator::new(&settings.trust_domain)),
        jwt,
        kube,
    ));

    let acceptor = tls::acceptor(
        ca.clone(),
        tls::ServerNames {
            dns: settings.server_dns.clone(),
            ips: settings.server_ips.clone(),
            lifetime: settings.server_cert_lifetime,
        },
    )
    .await
    .context("issuing the server's TLS certificate")?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let local = listener.local_addr()?;

    if let Some(addr) = settings.metrics_listen {
        let l = metrics::bind(addr)
            .await
            .with_context(|| format!("metrics listener {addr}"))?;
        println!("hsmca: metrics on http://{}/metrics", l.local_addr()?);
        tokio::spawn(metrics::serve(l, metrics.clone()));
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<IstioCertificateServiceServer<service::CaService>>()
        .await;
    tokio::spawn(probe_hsm(ca.clone(), health_reporter.clone()));
    let make_service = || {
        IstioCertificateServiceServer::new(service::CaService {
            ca: ca.clone(),
            authn: authn.clone(),
            metrics: metrics.clone(),
            policy: policy.clone(),
            audit: audit.clone(),
            rate_limit: settings.rate_limit.map(rate_limit::RateLimiter::new),
            trusted_node_accounts: settings.trusted_node_accounts.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE)
    };

    policy.watch(settings.trust_domain.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    if let Some(addr) = settings.plaintext_listen {
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("plaintext listener {addr}"))?;
        tracing::warn!(addr = %l.local_addr()?, "PLAINTEXT listener for local debugging: no caller is authenticated there");
        println!("hsmca: plaintext (debug) on {}", l.local_addr()?);
        let router = tonic::transport::Server::builder()
            .add_service(health_service.clone())
            .add_service(make_service());
        let rx = stop_rx.clone();
        tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, stopped(rx))
                .await
            {
                tracing::error!(error = %e, "plaintext listener failed");
            }
        });
    }

    tracing::info!(
        %local,
        trust_domain = %settings.trust_domain,
        authenticators = ?authn.names(),
        signer = %format!("{} in token {:?}", settings.key_label, settings.token.label),
        "serving istio.v1.auth.IstioCertificateService over TLS"
    );
    println!("hsmca: serving CreateCertificate on {local} (TLS)");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(make_service())
        .serve_with_incoming_shutdown(tls::incoming(listener, acceptor), stopped(stop_rx))
        .await?;
    if let Some(audit) = audit {
        tokio::task::spawn_blocking(move || audit.close()).await?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
