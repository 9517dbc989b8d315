//! The server's TLS: its own certificate, issued by our CA for a software key held only in
//! memory and renewed before it expires, and optional client certificates that must chain to
//! our root.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use x509_cert::name::Name;
use zeroize::Zeroizing;

use crate::ca::CLOCK_SKEW;
use crate::issuance::{self, CertKind, CertTemplate, WorkloadCa};

/// Names the server certificate answers to.
#[derive(Debug, Clone)]
pub struct ServerNames {
    /// DNS names (default `istiod.istio-system.svc`).
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
    /// Lifetime of each server certificate.
    pub lifetime: Duration,
}

/// Holds the current server certificate; rustls asks it at every handshake.
#[derive(Debug)]
pub struct ServerCertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// Issues a fresh server certificate for a new in-memory P-256 key (blocking: the token signs).
fn issue_server_cert(
    ca: &WorkloadCa,
    names: &ServerNames,
    provider: &CryptoProvider,
) -> anyhow::Result<(Arc<CertifiedKey>, SystemTime)> {
    let rng = SystemRandom::new();
    let pkcs8 = Zeroizing::new(
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("generating the server key failed"))?
            .as_ref()
            .to_vec(),
    );
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
        .map_err(|_| anyhow::anyhow!("loading the server key failed"))?;
    let public_key = hsmca_hsm::PublicKey::from_ec_point(
        hsmca_hsm::KeyAlgorithm::EcdsaP256,
        pair.public_key().as_ref(),
    )?;
    let issuer = ca.issuer();
    let now = SystemTime::now();
    let not_after = (now + names.lifetime).min(issuer.not_after.unwrap_or(now + names.lifetime));
    let template = CertTemplate {
        kind: CertKind::Server,
        serial: issuance::random_serial(),
        subject: Name::default(),
        not_before: now - CLOCK_SKEW,
        not_after,
        public_key,
        extensions: issuance::server_extensions(&issuer.ski, &names.dns, &names.ips)?,
    };
    let linted = issuance::lint(issuance::prepare(template, issuer)?)?;
    let cert = issuance::issue(linted, ca.signer().as_ref())?;
    let mut chain = vec![CertificateDer::from(der::Encode::to_der(&cert)?)];
    for c in &ca.files().full_chain() {
        chain.push(CertificateDer::from(der::Encode::to_der(c)?));
    }
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8.to_vec()));
    let signing_key = provider.key_provider.load_private_key(key_der)?;
    Ok((Arc::new(CertifiedKey::new(chain, signing_key)), not_after))
}

/// Builds the TLS acceptor (TLS 1.2 and 1.3, h2, optional client certificates chained to our
/// root) and starts renewing the server certificate at half its lifetime.
pub async fn acceptor(ca: Arc<WorkloadCa>, names: ServerNames) -> anyhow::Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let first = {
        let (ca, names, provider) = (ca.clone(), names.clone(), provider.clone());
        tokio::task::spawn_blocking(move || issue_server_cert(&ca, &names, &provider)).await??
    };
    let resolver = Arc::new(ServerCertResolver {
        current: RwLock::new(first.0),
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(der::Encode::to_der(
        ca.files().root(),
    )?))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec()];

    // Renewal: at half the remaining lifetime; on failure retry after a minute.
    let mut expires = first.1;
    tokio::spawn(async move {
        loop {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep((left / 2).max(Duration::from_secs(1))).await;
            let (ca, names, provider) = (ca.clone(), names.clone(), provider.clone());
            match tokio::task::spawn_blocking(move || issue_server_cert(&ca, &names, &provider))
                .await
            {
                Ok(Ok((key, not_after))) => {
                    *resolver.current.write().unwrap_or_else(|p| p.into_inner()) = key;
                    expires = not_after;
                    tracing::info!(not_after = %humantime_secs(not_after), "renewed the server TLS certificate");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "renewing the server TLS certificate failed; retrying in 60s");
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Err(e) => tracing::error!(error = %e, "server certificate renewal task failed"),
            }
        }
    });
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn humantime_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Accepts TCP connections and completes TLS handshakes (each bounded by a timeout) off the
/// accept loop; finished streams go to the gRPC server.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let (tcp, peer): (TcpStream, SocketAddr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let sender = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = sender.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
            if tx.is_closed() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
