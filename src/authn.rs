//! Who is calling: the authenticators, tried in Istio's order (client certificate, then JWT
//! from a configured OIDC issuer, then Kubernetes service-account JWT); the first success wins.
//!
//! An authenticator never trusts anything from the CSR. Its result, a [`Caller`], goes on to
//! policy and audit.

mod client_cert;
mod jwt;
mod kube_jwt;

use std::fmt;
use std::net::SocketAddr;

use sha2::Digest;
use zeroize::Zeroizing;

pub use client_cert::ClientCertAuthenticator;
pub use jwt::{JwtAuthenticator, JwtRule};
pub use kube_jwt::{KubeJwtAuthenticator, KubeJwtSettings};

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// A client certificate issued by this CA.
    ClientCert,
    /// A Kubernetes service-account token checked with a TokenReview.
    KubeJwt,
    /// A JWT from a configured OIDC issuer, checked against its JWKS.
    Jwt,
}

impl AuthKind {
    /// The policy name of the authenticator.
    pub fn name(self) -> &'static str {
        match self {
            AuthKind::ClientCert => "client-cert",
            AuthKind::KubeJwt => "kube-jwt",
            AuthKind::Jwt => "jwt",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The authenticator that accepted it.
    pub kind: AuthKind,
    /// Its identities (SPIFFE IDs).
    pub identities: Vec<String>,
    /// The cluster it was authenticated in (Kubernetes JWT only).
    pub cluster: Option<String>,
    /// Kubernetes namespace.
    pub namespace: Option<String>,
    /// Kubernetes service account.
    pub service_account: Option<String>,
    /// Pod name, from the TokenReview `extra` fields.
    pub pod_name: Option<String>,
    /// Pod UID, from the TokenReview `extra` fields.
    pub pod_uid: Option<String>,
    /// SHA-256 of the bearer token (never the token itself).
    pub token_sha256: Option<String>,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.name(), self.identities.join(","))
    }
}

/// What the transport tells us about a request.
pub struct RequestCredentials {
    /// The request arrived over TLS.
    pub tls: bool,
    /// The verified client certificate chain (leaf first), DER.
    pub peer_certs: Vec<Vec<u8>>,
    /// The bearer token from `authorization: Bearer ...`.
    pub bearer: Option<Zeroizing<String>>,
    /// Every value of the `clusterid` header.
    pub cluster_ids: Vec<String>,
    /// The peer address.
    pub peer: Option<SocketAddr>,
}

impl fmt::Debug for RequestCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestCredentials")
            .field("tls", &self.tls)
            .field("peer_certs", &self.peer_certs.len())
            .field("bearer", &self.bearer.as_ref().map(|_| "..."))
            .field("cluster_ids", &self.cluster_ids)
            .field("peer", &self.peer)
            .finish()
    }
}

impl RequestCredentials {
    /// SHA-256 of the bearer token, hex.
    pub fn token_sha256(&self) -> Option<String> {
        self.bearer
            .as_ref()
            .map(|t| hex::encode(sha2::Sha256::digest(t.as_bytes())))
    }
}

/// The outcome of one authenticator.
#[derive(Debug)]
pub enum Outcome {
    /// The request carries nothing this authenticator looks at.
    NotApplicable,
    /// Authenticated.
    Success(Caller),
    /// The credentials were presented and refused, with a reason for the caller.
    Failure(String),
    /// The authenticator could not reach what it depends on (API server down).
    Unavailable(String),
}

/// The configured authenticators, in Istio's order.
pub struct Authenticators {
    client_cert: Option<ClientCertAuthenticator>,
    jwt: Option<JwtAuthenticator>,
    kube_jwt: Option<KubeJwtAuthenticator>,
}

/// Why authentication failed, for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No authenticator accepted the request.
    Unauthenticated(String),
    /// An authenticator's backend is unreachable and nothing else accepted the request.
    Unavailable(String),
}

impl Authenticators {
    /// Builds the chain.
    pub fn new(
        client_cert: Option<ClientCertAuthenticator>,
        jwt: Option<JwtAuthenticator>,
        kube_jwt: Option<KubeJwtAuthenticator>,
    ) -> Self {
        Authenticators {
            client_cert,
            jwt,
            kube_jwt,
        }
    }

    /// Names of the enabled authenticators.
    pub fn names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.client_cert.is_some() {
            v.push(AuthKind::ClientCert.name());
        }
        if self.jwt.is_some() {
            v.push(AuthKind::Jwt.name());
        }
        if self.kube_jwt.is_some() {
            v.push(AuthKind::KubeJwt.name());
        }
        v
    }

    /// Tries each authenticator in order; the first success wins.
    pub async fn authenticate(&self, creds: &RequestCredentials) -> Result<Caller, AuthError> {
        let mut reasons = Vec::new();
        let mut unavailable = None;
        if let Some(a) = &self.client_cert {
            match a.authenticate(creds) {
                Outcome::Success(c) => return Ok(c),
                Outcome::Failure(r) => reasons.push(format!("client-cert: {r}")),
                Outcome::Unavailable(r) => unavailable = Some(r),
                Outcome::NotApplicable => {}
            }
        }
        if let Some(a) = &self.jwt {
            match a.authenticate(creds) {
                Outcome::Success(c) => return Ok(c),
                Outcome::Failure(r) => reasons.push(format!("jwt: {r}")),
                Outcome::Unavailable(r) => unavailable = Some(r),
                Outcome::NotApplicable => {}
            }
        }
        if let Some(a) = &self.kube_jwt {
            match a.authenticate(creds).await {
                Outcome::Success(c) => return Ok(c),
                Outcome::Failure(r) => reasons.push(format!("kube-jwt: {r}")),
                Outcome::Unavailable(r) => unavailable = Some(r),
                Outcome::NotApplicable => {}
            }
        }
        if let Some(r) = unavailable
            && reasons.is_empty()
        {
            return Err(AuthError::Unavailable(r));
        }
        if reasons.is_empty() {
            let how = if creds.tls {
                "present a client certificate issued by this CA or an `authorization: Bearer <token>` header"
            } else {
                "use TLS: a plaintext caller is never authenticated"
            };
            reasons.push(format!("no credentials: {how}"));
        }
        Err(AuthError::Unauthenticated(format!(
            "request authenticate failure: {}",
            reasons.join("; ")
        )))
    }
}
