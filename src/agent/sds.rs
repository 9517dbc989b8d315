//! Envoy's Secret Discovery Service (v3) over a Unix socket: `StreamSecrets` with Istio's
//! ACK/NACK/nonce rules, `FetchSecrets` for one-shot clients, `DeltaSecrets` unimplemented.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use envoy_types::pb::google::protobuf::Any;
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::secrets::Secrets;
use super::stream_state::{Action, Incoming, StreamState};

/// The SDS type URL.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The workload certificate resource.
pub const DEFAULT: &str = "default";
/// The trust bundle resource.
pub const ROOTCA: &str = "ROOTCA";

/// The SDS service.
pub struct SdsService {
    secrets: Secrets,
    version: Arc<AtomicU64>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl SdsService {
    /// Serves `secrets`; every stream ends when `stopping` turns true.
    pub fn new(secrets: Secrets, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        SdsService {
            secrets,
            version: Arc::new(AtomicU64::new(0)),
            stopping,
        }
    }
}

fn inline(bytes: &[u8]) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes.to_vec())),
        ..Default::default()
    })
}

/// Waits until the named secret exists, then encodes it. Unknown names are an error.
async fn resource(secrets: &Secrets, name: &str) -> Result<Any, Status> {
    let r#type = match name {
        DEFAULT => {
            let mut rx = secrets.workload.clone();
            let s = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| Status::unavailable("the agent stopped"))?
                .clone()
                .expect("waited for Some");
            secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(s.chain_pem.as_bytes()),
                private_key: inline(s.key_pem.as_bytes()),
                ..Default::default()
            })
        }
        ROOTCA => {
            let mut rx = secrets.roots.clone();
            let r = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| Status::unavailable("the agent stopped"))?
                .clone()
                .expect("waited for Some");
            secret::Type::ValidationContext(CertificateValidationContext {
                trusted_ca: inline(r.as_bytes()),
                ..Default::default()
            })
        }
        other => {
            return Err(Status::not_found(format!(
                "unknown SDS resource {other:?}: this agent serves \"default\" and \"ROOTCA\""
            )));
        }
    };
    let secret = Secret {
        name: name.to_owned(),
        r#type: Some(r#type),
    };
    Ok(Any {
        type_url: SECRET_TYPE.into(),
        value: secret.encode_to_vec(),
    })
}

async fn response(
    secrets: &Secrets,
    version: &AtomicU64,
    names: &[String],
) -> Result<DiscoveryResponse, Status> {
    let mut resources = Vec::with_capacity(names.len());
    for n in names {
        resources.push(resource(secrets, n).await?);
    }
    let v = version.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(DiscoveryResponse {
        version_info: format!("{}/{v}", jiff::Timestamp::now()),
        resources,
        type_url: SECRET_TYPE.into(),
        nonce: format!("{:032x}", rand::random::<u128>()),
        ..Default::default()
    })
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = DeltaStream;
    type StreamSecretsStream = ResponseStream;

    async fn delta_secrets(
        &self,
        _r: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented(
            "DeltaSecrets is not implemented; use StreamSecrets",
        ))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
        if req.resource_names.is_empty() {
            return Err(Status::invalid_argument("name at least one resource"));
        }
        Ok(Response::new(
            response(&self.secrets, &self.version, &req.resource_names).await?,
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DiscoveryResponse, Status>>(16);
        let secrets = self.secrets.clone();
        let version = self.version.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut state = StreamState::default();
            let mut workload = secrets.workload.clone();
            let mut roots = secrets.roots.clone();
            workload.mark_unchanged();
            roots.mark_unchanged();
            loop {
                let names: Vec<String> = tokio::select! {
                    _ = stopping.changed() => break,
                    msg = inbound.message() => {
                        let req = match msg {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(e) => {
                                tracing::debug!(error = %e, "SDS stream closed");
                                break;
                            }
                        };
                        let incoming = Incoming {
                            node_id: req.node.as_ref().map(|n| n.id.as_str()),
                            names: &req.resource_names,
                            nonce: &req.response_nonce,
                            error: req.error_detail.as_ref().map(|e| e.message.as_str()),
                        };
                        match state.on_request(&incoming) {
                            Ok(Action::Respond(names)) => names,
                            Ok(Action::Nack(why)) => {
                                tracing::warn!(node = state.node().unwrap_or(""), names = ?req.resource_names, error = %why, "Envoy rejected a secret (NACK)");
                                continue;
                            }
                            Ok(Action::Ignore(_)) => continue,
                            Err(e) => {
                                let _ = tx.send(Err(Status::invalid_argument(e.0))).await;
                                break;
                            }
                        }
                    }
                    Ok(()) = workload.changed() => {
                        if !state.watched().contains(DEFAULT) { continue; }
                        vec![DEFAULT.to_owned()]
                    }
                    Ok(()) = roots.changed() => {
                        if !state.watched().contains(ROOTCA) { continue; }
                        vec![ROOTCA.to_owned()]
                    }
                };
                match response(&secrets, &version, &names).await {
                    Ok(resp) => {
                        let nonce = resp.nonce.clone();
                        tracing::debug!(node = state.node().unwrap_or(""), ?names, version = %resp.version_info, "SDS push");
                        if tx.send(Ok(resp)).await.is_err() {
                            break;
                        }
                        state.sent(nonce);
                    }
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
