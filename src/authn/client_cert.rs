//! Client-certificate authentication: the TLS layer has verified the chain to our root; the
//! identities are the SPIFFE URI SANs of the leaf. This is how a workload renews.

use der::Decode;
use hsmca_policy::SpiffeId;
use x509_cert::Certificate;
use x509_cert::ext::pkix::SubjectAltName;
use x509_cert::ext::pkix::name::GeneralName;

use super::{AuthKind, Caller, Outcome, RequestCredentials};

/// Accepts callers whose verified client certificate carries a SPIFFE ID of our trust domain.
#[derive(Debug, Clone)]
pub struct ClientCertAuthenticator {
    trust_domain: String,
}

impl ClientCertAuthenticator {
    /// An authenticator for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        ClientCertAuthenticator {
            trust_domain: trust_domain.to_owned(),
        }
    }

    pub(super) fn authenticate(&self, creds: &RequestCredentials) -> Outcome {
        let Some(leaf) = creds.peer_certs.first() else {
            return Outcome::NotApplicable;
        };
        let cert = match Certificate::from_der(leaf) {
            Ok(c) => c,
            Err(_) => return Outcome::Failure("client certificate does not parse".into()),
        };
        let san = match cert.tbs_certificate().get_extension::<SubjectAltName>() {
            Ok(Some((_, san))) => san,
            _ => return Outcome::Failure("the SAN extension does not exist".into()),
        };
        let mut identities = Vec::new();
        for name in &san.0 {
            if let GeneralName::UniformResourceIdentifier(uri) = name {
                match SpiffeId::parse(uri.as_str()) {
                    Ok(id) if id.trust_domain() == self.trust_domain => identities.push(id),
                    _ => {}
                }
            }
        }
        let Some(first) = identities.first() else {
            return Outcome::Failure(format!(
                "client certificate has no SPIFFE ID in trust domain {}",
                self.trust_domain
            ));
        };
        let (namespace, service_account) = first
            .namespace_and_service_account()
            .map(|(n, s)| (Some(n.to_owned()), Some(s.to_owned())))
            .unwrap_or_default();
        Outcome::Success(Caller {
            kind: AuthKind::ClientCert,
            identities: identities.iter().map(ToString::to_string).collect(),
            cluster: None,
            namespace,
            service_account,
            pod_name: None,
            pod_uid: None,
            token_sha256: None,
        })
    }
}
