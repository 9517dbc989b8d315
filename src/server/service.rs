//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: the request pipeline, and the one
//! place where domain errors become gRPC statuses.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use hsmca_policy::SpiffeId;
use hsmca_proto::{IstioCertificateRequest, IstioCertificateResponse, IstioCertificateService};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::metrics::Metrics;
use super::policy_store::PolicyStore;
use crate::audit::{AuditLog, Kind, Record};
use crate::authn::{AuthError, AuthKind, Authenticators, Caller, RequestCredentials};
use crate::issuance::{WorkloadCa, WorkloadError};

/// The CA service.
pub struct CaService {
    pub(super) ca: Arc<WorkloadCa>,
    pub(super) authn: Arc<Authenticators>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) policy: Arc<PolicyStore>,
    /// Per-identity rate limit.
    pub(super) rate_limit: Option<super::rate_limit::RateLimiter>,
    /// The audit log; `None` only when auditing is switched off (benchmarks).
    pub(super) audit: Option<Arc<AuditLog>>,
    /// `<ns>/<sa>` of callers allowed to ask for another identity (`CA_TRUSTED_NODE_ACCOUNTS`).
    pub(super) trusted_node_accounts: Vec<String>,
}

/// Why a request was refused; mapped to a gRPC status in [`RequestError::into_status`].
#[derive(Debug)]
pub enum RequestError {
    /// Authentication failed (or impersonation was refused).
    Unauthenticated(String),
    /// The CSR or the lifetime is unacceptable.
    InvalidArgument(String),
    /// Policy refused the request.
    PermissionDenied(String),
    /// The caller is over its rate limit.
    ResourceExhausted(String),
    /// The HSM or an authentication backend is unreachable.
    Unavailable(String),
    /// Our bug or an unexpected failure; the detail is logged, never sent.
    Internal(String),
}

impl RequestError {
    fn into_status(self) -> Status {
        match self {
            RequestError::Unauthenticated(m) => Status::unauthenticated(m),
            RequestError::InvalidArgument(m) => Status::invalid_argument(m),
            RequestError::PermissionDenied(m) => Status::permission_denied(m),
            RequestError::ResourceExhausted(m) => Status::resource_exhausted(m),
            RequestError::Unavailable(m) => Status::unavailable(m),
            RequestError::Internal(_) => {
                Status::internal("CSR signing error: the CA failed internally; see its log")
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            RequestError::Unauthenticated(_) => "Unauthenticated",
            RequestError::InvalidArgument(_) => "InvalidArgument",
            RequestError::PermissionDenied(_) => "PermissionDenied",
            RequestError::ResourceExhausted(_) => "ResourceExhausted",
            RequestError::Unavailable(_) => "Unavailable",
            RequestError::Internal(_) => "Internal",
        }
    }

    fn detail(&self) -> &str {
        match self {
            RequestError::Unauthenticated(m)
            | RequestError::InvalidArgument(m)
            | RequestError::PermissionDenied(m)
            | RequestError::ResourceExhausted(m)
            | RequestError::Unavailable(m)
            | RequestError::Internal(m) => m,
        }
    }
}

fn credentials<T>(request: &Request<T>) -> RequestCredentials {
    let peer_certs: Option<Vec<Vec<u8>>> = request
        .peer_certs()
        .map(|certs| certs.iter().map(|c| c.as_ref().to_vec()).collect());
    let tls = request
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .is_some();
    let bearer = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("Istio "))
        })
        .map(|t| Zeroizing::new(t.trim().to_owned()))
        .filter(|t| !t.is_empty());
    let cluster_ids = request
        .metadata()
        .get_all("clusterid")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    RequestCredentials {
        tls,
        peer_certs: peer_certs.unwrap_or_default(),
        bearer,
        cluster_ids,
        peer: request.remote_addr(),
    }
}

fn impersonated_identity(req: &IstioCertificateRequest) -> Result<Option<String>, RequestError> {
    let Some(meta) = &req.metadata else {
        return Ok(None);
    };
    let Some(value) = meta.fields.get("ImpersonatedIdentity") else {
        return Ok(None);
    };
    match &value.kind {
        Some(prost_types::value::Kind::StringValue(s)) if s.is_empty() => Ok(None),
        Some(prost_types::value::Kind::StringValue(s)) => Ok(Some(s.clone())),
        _ => Err(RequestError::Unauthenticated(
            "request impersonation authentication failure: ImpersonatedIdentity must be a string"
                .into(),
        )),
    }
}

/// How long a signature may take before the HSM counts as not answering.
pub(crate) const HSM_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl CaService {
    /// The identity a trusted node agent asks for on behalf of a workload, when it may: the
    /// caller is a trusted node account (checked: Kubernetes JWT caller whose `<ns>/<sa>` is in
    /// the trusted list; the requested ID is an Istio workload SPIFFE ID of our trust domain).
    fn impersonation(
        &self,
        caller: &Caller,
        impersonate: Option<String>,
    ) -> Result<Option<SpiffeId>, RequestError> {
        let Some(requested) = impersonate else {
            return Ok(None);
        };
        let refuse = |why: &str| {
            tracing::warn!(caller = %caller, requested = %requested, why, "impersonation refused");
            RequestError::Unauthenticated("request impersonation authentication failure".into())
        };
        if caller.kind != AuthKind::KubeJwt {
            return Err(refuse("only Kubernetes JWT callers may impersonate"));
        }
        let account = format!(
            "{}/{}",
            caller.namespace.as_deref().unwrap_or_default(),
            caller.service_account.as_deref().unwrap_or_default()
        );
        if !self.trusted_node_accounts.contains(&account) {
            return Err(refuse("caller is not a trusted node account"));
        }
        let id = SpiffeId::parse(&requested).map_err(|_| refuse("not a SPIFFE ID"))?;
        if id.trust_domain() != self.ca.settings().trust_domain
            || id.namespace_and_service_account().is_none()
        {
            return Err(refuse("not a workload identity of this trust domain"));
        }
        Ok(Some(id))
    }

    /// Asks the policy, for the caller or the identity it is allowed to impersonate.
    fn decide(
        &self,
        caller: &Caller,
        impersonated: Option<&SpiffeId>,
        csr: &crate::issuance::CheckedCsr,
        validity_seconds: i64,
        trail: &mut Record,
    ) -> Result<hsmca_policy::Allowed, RequestError> {
        let policy = self.policy.current();
        trail.policy_version = Some(policy.version_hash.clone());
        let impersonated_id = impersonated.map(ToString::to_string);
        let (namespace, service_account) =
            match impersonated.and_then(|s| s.namespace_and_service_account()) {
                Some((n, s)) => (Some(n), Some(s)),
                None => (
                    caller.namespace.as_deref(),
                    caller.service_account.as_deref(),
                ),
            };
        let request = hsmca_policy::Request {
            authenticator: caller.kind.name(),
            identities: &caller.identities,
            cluster: caller.cluster.as_deref(),
            namespace,
            service_account,
            pod: caller.pod_name.as_deref(),
            key_type: &csr.key_type,
            csr_uri_sans: &csr.uri_sans,
            csr_dns_sans: &csr.dns_sans,
            csr_has_common_name: csr.has_common_name,
            lifetime: (validity_seconds > 0)
                .then(|| std::time::Duration::from_secs(validity_seconds as u64)),
            impersonated: impersonated_id.as_deref(),
            now: SystemTime::now(),
        };
        match hsmca_policy::evaluate(&policy, &request) {
            hsmca_policy::Decision::Allow(a) => {
                trail.policy_rule = Some(a.rule.clone());
                Ok(a)
            }
            hsmca_policy::Decision::Deny(d) => {
                trail.policy_rule = Some(d.rule.clone());
                let message = format!("denied by {}: {}", d.rule, d.reason);
                match d.kind {
                    hsmca_policy::DenyKind::InvalidRequest => {
                        self.metrics
                            .out_of_bounds_count
                            .fetch_add(1, Ordering::Relaxed);
                        Err(RequestError::InvalidArgument(message))
                    }
                    _ => Err(RequestError::PermissionDenied(message)),
                }
            }
        }
    }

    async fn handle(
        &self,
        creds: &RequestCredentials,
        req: IstioCertificateRequest,
        trail: &mut Record,
    ) -> Result<(Caller, crate::issuance::Issued), (Option<Caller>, RequestError)> {
        let m = &self.metrics;
        trail.requested_lifetime_s = Some(req.validity_duration);
        let caller = self.authn.authenticate(creds).await.map_err(|e| {
            m.authentication_failure_count
                .fetch_add(1, Ordering::Relaxed);
            match e {
                AuthError::Unauthenticated(r) => (None, RequestError::Unauthenticated(r)),
                AuthError::Unavailable(r) => (None, RequestError::Unavailable(r)),
            }
        })?;
        trail.authenticator = Some(caller.kind.name().to_owned());
        trail.identities = caller.identities.clone();
        trail.cluster = caller.cluster.clone();
        let with = |e| (Some(caller.clone()), e);
        if let Some(limiter) = &self.rate_limit {
            let key = format!(
                "{}|{}",
                caller.identities.join(","),
                caller.cluster.as_deref().unwrap_or("")
            );
            if !limiter.allow(&key, Instant::now()) {
                return Err(with(RequestError::ResourceExhausted(format!(
                    "rate limit exceeded for {}: at most {} requests/s per identity (bursts of {}); retry later",
                    caller.identities.join(","),
                    limiter.limit().rate,
                    limiter.limit().burst
                ))));
            }
        }
        let impersonate = impersonated_identity(&req).map_err(with)?;
        trail.impersonated = impersonate.clone();
        let impersonated = self.impersonation(&caller, impersonate).map_err(with)?;
        trail.csr_sha256 = Some(crate::audit::sha256_hex(req.csr.as_bytes()));
        let csr = crate::issuance::check_csr(&req.csr).map_err(|e| {
            m.csr_parsing_err_count.fetch_add(1, Ordering::Relaxed);
            with(RequestError::InvalidArgument(e.to_string()))
        })?;
        trail.requested_sans = csr.uri_sans.iter().chain(&csr.dns_sans).cloned().collect();
        let allowed = self
            .decide(
                &caller,
                impersonated.as_ref(),
                &csr,
                req.validity_duration,
                trail,
            )
            .map_err(with)?;
        trail.decision = Some("allow".into());
        let linted = self
            .ca
            .prepare(&csr, &allowed)
            .map_err(|e| with(self.sign_error(e)))?;
        let (not_before, not_after) = linted.validity();
        trail.serial = Some(linted.serial_hex());
        trail.not_before = Some(rfc3339(not_before));
        trail.not_after = Some(rfc3339(not_after));
        trail.sans = allowed
            .uri_sans
            .iter()
            .chain(&allowed.dns_sans)
            .cloned()
            .collect();
        if let Some(audit) = &self.audit {
            // Boulder's habit: the intent is on disk before the HSM is called, so a log that
            // cannot be written stops issuing before anything is signed.
            trail.kind = Kind::Signing;
            audit.append_durable(trail.clone()).await.map_err(|e| {
                with(RequestError::Unavailable(format!(
                    "{e}; the CA signs nothing it cannot record"
                )))
            })?;
        }
        let ca = self.ca.clone();
        let started = Instant::now();
        // A hung HSM must not hang the caller: past the deadline the request is refused (the
        // blocked call finishes or fails on its own; its session stays out of the pool).
        let signing = tokio::task::spawn_blocking(move || ca.sign(linted));
        let issued = match tokio::time::timeout(HSM_DEADLINE, signing).await {
            Err(_) => {
                m.hsm_error_count.fetch_add(1, Ordering::Relaxed);
                return Err(with(RequestError::Unavailable(
                    "the CA's HSM did not answer in time; retry later".into(),
                )));
            }
            Ok(joined) => joined
                .map_err(|e| with(RequestError::Internal(format!("signing task failed: {e}"))))?
                .map_err(|e| with(self.sign_error(e)))?,
        };
        m.observe_signing(started.elapsed());
        if let Some(audit) = &self.audit {
            trail.kind = Kind::Signed;
            trail.cert_sha256 = Some(crate::audit::sha256_hex(&issued.der));
            audit.append_durable(trail.clone()).await.map_err(|e| {
                with(RequestError::Unavailable(format!(
                    "{e}; the certificate was signed but is withheld because it could not be recorded"
                )))
            })?;
        }
        m.success_cert_issuance_count
            .fetch_add(1, Ordering::Relaxed);
        Ok((caller, issued))
    }

    fn sign_error(&self, e: WorkloadError) -> RequestError {
        let m = &self.metrics;
        match e {
            WorkloadError::BadCsr(r) | WorkloadError::BadIdentity(r) => {
                RequestError::InvalidArgument(r)
            }
            WorkloadError::Hsm(h) => {
                m.csr_sign_err_count.fetch_add(1, Ordering::Relaxed);
                m.hsm_error_count.fetch_add(1, Ordering::Relaxed);
                if h.is_unavailable() {
                    RequestError::Unavailable("the CA's HSM is unavailable; retry later".into())
                } else {
                    RequestError::Internal(format!("HSM: {h}"))
                }
            }
            other => {
                m.csr_sign_err_count.fetch_add(1, Ordering::Relaxed);
                RequestError::Internal(other.to_string())
            }
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let started = Instant::now();
        self.metrics.csr_count.fetch_add(1, Ordering::Relaxed);
        let creds = credentials(&request);
        let peer = creds.peer.map(|p| p.to_string()).unwrap_or_default();
        let mut trail = Record {
            request_id: Some(format!("{:016x}", rand::random::<u64>())),
            peer: Some(peer.clone()),
            token_sha256: creds.token_sha256(),
            ..Default::default()
        };
        let result = self.handle(&creds, request.into_inner(), &mut trail).await;
        if let (Err((_, e)), Some(audit)) = (&result, &self.audit) {
            // Every refusal is recorded too; after approval it is a signing failure.
            trail.kind = if trail.kind == Kind::Signing {
                Kind::Failed
            } else {
                Kind::Decision
            };
            if trail.kind == Kind::Decision {
                trail.decision = Some("deny".into());
            }
            trail.reason = Some(e.detail().to_owned());
            trail.status = Some(e.code().to_owned());
            if let Err(err) = audit.append_durable(trail.clone()).await {
                tracing::error!(error = %err, request_id = ?trail.request_id, "a refusal could not be recorded");
            }
        }
        match result {
            Ok((caller, issued)) => {
                tracing::info!(
                    peer,
                    request_id = trail.request_id.as_deref().unwrap_or(""),
                    caller = %caller,
                    cluster = caller.cluster.as_deref().unwrap_or(""),
                    serial = %issued.serial,
                    rule = trail.policy_rule.as_deref().unwrap_or(""),
                    not_after = issued.not_after.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs(),
                    ms = started.elapsed().as_millis() as u64,
                    "issued"
                );
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: issued.chain,
                }))
            }
            Err((caller, e)) => {
                let caller = caller.map(|c| c.to_string()).unwrap_or_default();
                if matches!(e, RequestError::Internal(_) | RequestError::Unavailable(_)) {
                    tracing::error!(
                        peer,
                        caller,
                        code = e.code(),
                        detail = e.detail(),
                        "refused"
                    );
                } else {
                    tracing::warn!(
                        peer,
                        caller,
                        code = e.code(),
                        detail = e.detail(),
                        "refused"
                    );
                }
                Err(e.into_status())
            }
        }
    }
}
