//! The agent's client of the CA: CreateCertificate over TLS verified against the CA root,
//! `authorization: Bearer <token>` read fresh from the token file for every call, `clusterid`
//! when configured, and Istio's retry policy (5 attempts, exponential backoff from 100 ms with
//! jitter, on codes that may pass).

use std::path::PathBuf;
use std::time::Duration;

use hsmca_proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use zeroize::Zeroizing;

/// How to reach the CA.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `HOST:PORT`.
    pub addr: String,
    /// The CA root (PEM) that the CA's serving certificate must chain to.
    pub root_pem: String,
    /// Projected service-account token file (read for every call).
    pub token_file: Option<PathBuf>,
    /// `clusterid` header value.
    pub cluster_id: Option<String>,
}

/// Codes Istio's agent retries.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Internal
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
            | Code::Unknown
    )
}

/// Asks the CA for a certificate: returns `cert_chain` (leaf first, root last).
pub async fn create_certificate(
    cfg: &CaClientConfig,
    csr_pem: &str,
    ttl: Duration,
) -> Result<Vec<String>, tonic::Status> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match call(cfg, csr_pem, ttl).await {
            Ok(chain) => return Ok(chain),
            Err(status) if attempt < 5 && retryable(status.code()) => {
                let jitter = 0.9 + rand::random::<f64>() * 0.2;
                tracing::debug!(attempt, code = ?status.code(), "CreateCertificate failed; retrying");
                tokio::time::sleep(delay.mul_f64(jitter)).await;
                delay *= 2;
                attempt += 1;
            }
            Err(status) => return Err(status),
        }
    }
}

async fn call(
    cfg: &CaClientConfig,
    csr_pem: &str,
    ttl: Duration,
) -> Result<Vec<String>, tonic::Status> {
    let host = cfg
        .addr
        .rsplit_once(':')
        .map_or(cfg.addr.as_str(), |(h, _)| h)
        .trim_matches(['[', ']']);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cfg.root_pem))
        .domain_name(host);
    let endpoint = Endpoint::from_shared(format!("https://{}", cfg.addr))
        .map_err(|e| tonic::Status::invalid_argument(format!("CA address {}: {e}", cfg.addr)))?
        .tls_config(tls)
        .map_err(|e| tonic::Status::unavailable(format!("TLS to the CA: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let channel = endpoint.connect().await.map_err(|e| {
        tonic::Status::unavailable(format!("cannot reach the CA at {}: {e}", cfg.addr))
    })?;
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut request = tonic::Request::new(IstioCertificateRequest {
        csr: csr_pem.to_owned(),
        validity_duration: ttl.as_secs() as i64,
        metadata: None,
    });
    if let Some(file) = &cfg.token_file {
        let token = Zeroizing::new(std::fs::read_to_string(file).map_err(|e| {
            tonic::Status::unauthenticated(format!(
                "reading the token file {}: {e}",
                file.display()
            ))
        })?);
        let token = token.trim();
        if !token.is_empty() {
            let value = Zeroizing::new(format!("Bearer {token}"));
            request.metadata_mut().insert(
                "authorization",
                value.parse().map_err(|_| {
                    tonic::Status::unauthenticated("the token is not a valid header value")
                })?,
            );
        }
    }
    if let Some(id) = &cfg.cluster_id {
        request.metadata_mut().insert(
            "clusterid",
            id.parse().map_err(|_| {
                tonic::Status::invalid_argument("cluster id is not a valid header value")
            })?,
        );
    }
    let response = client.create_certificate(request).await?.into_inner();
    if response.cert_chain.len() < 2 {
        return Err(tonic::Status::internal(
            "invalid empty CertChain: the CA returned fewer than two certificates",
        ));
    }
    Ok(response.cert_chain)
}
