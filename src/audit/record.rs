//! One audit record.

use serde::{Deserialize, Serialize};

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The CA started (with its configuration digest).
    #[default]
    Start,
    /// A request was refused (authentication, CSR, policy): the decision and its reason.
    Decision,
    /// Approved and linted; the HSM is about to sign (Boulder's habit).
    Signing,
    /// Signed, verified, about to be returned.
    Signed,
    /// Signing failed after approval.
    Failed,
    /// A seal: signed by the audit key over this line.
    Checkpoint,
    /// Start-up found a torn last line and kept it aside.
    Recovered,
    /// A key ceremony action (key generation, root or intermediate signing, import).
    Ceremony,
    /// The CA stopped cleanly.
    Stop,
}

/// One record. Chain fields (`v`, `seq`, `time`, `prev`) are set by the writer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Schema version.
    pub v: u32,
    /// Sequence number.
    pub seq: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// SHA-256 of the previous line.
    pub prev: String,
    /// Record kind.
    pub kind: Kind,
    /// Request id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub request_id: Option<String>,
    /// Peer address.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer: Option<String>,
    /// Authenticator that accepted the caller.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub authenticator: Option<String>,
    /// Caller identities.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub identities: Vec<String>,
    /// Cluster id.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cluster: Option<String>,
    /// SHA-256 of the bearer token (never the token).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub token_sha256: Option<String>,
    /// Identity asked for by a node agent.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub impersonated: Option<String>,
    /// Requested lifetime, seconds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub requested_lifetime_s: Option<i64>,
    /// SHA-256 of the CSR as received.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub csr_sha256: Option<String>,
    /// SANs the CSR asked for.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub requested_sans: Vec<String>,
    /// Policy rule that decided.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy_rule: Option<String>,
    /// SHA-256 of the policy text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy_version: Option<String>,
    /// `allow` or `deny`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub decision: Option<String>,
    /// Why (for a refusal or failure), or what (for a ceremony).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// gRPC status returned.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<String>,
    /// Certificate serial, hex.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub serial: Option<String>,
    /// notBefore, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub not_before: Option<String>,
    /// notAfter, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub not_after: Option<String>,
    /// SANs of the certificate.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub sans: Vec<String>,
    /// SHA-256 of the certificate DER.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cert_sha256: Option<String>,
    /// Checkpoint: id of the audit key (SHA-256 of its SPKI, hex).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key_id: Option<String>,
    /// Checkpoint: the signature (base64).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sig: Option<String>,
    /// Recovered: where the torn bytes were kept, and their digest.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub torn: Option<String>,
}
