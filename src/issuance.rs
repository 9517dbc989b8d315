//! The issuance pipeline: a certificate template becomes a TBS certificate, the linter checks
//! the exact TBS bytes, and only a [`LintedTbs`] can reach the signer.
//!
//! ```text
//! CertTemplate ─prepare─▶ PreparedTbs ─lint─▶ LintedTbs ─issue (HSM sign, verify)─▶ Certificate
//! ```

mod lint;
mod profile;
mod tbs;
mod workload;

#[cfg(test)]
pub(crate) mod test_signer;

pub use lint::{LintError, LintedTbs, lint};
pub use profile::{
    CertKind, OID_CLIENT_AUTH, OID_SERVER_AUTH, intermediate_extensions, key_identifier,
    leaf_extensions, root_extensions, server_extensions,
};
pub use tbs::{CertTemplate, IssueError, IssuerInfo, PreparedTbs, issue, prepare, random_serial};
pub use workload::{
    CheckedCsr, Issued, MAX_CSR_BYTES, WorkloadCa, WorkloadError, WorkloadSettings, check_csr,
};

/// A serial number as hex, as OpenSSL and Envoy print it: without the leading zero byte that
/// DER adds to keep the integer positive.
pub fn serial_hex(serial: &x509_cert::serial_number::SerialNumber) -> String {
    let bytes = serial.as_bytes();
    let start = bytes
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(bytes.len().saturating_sub(1));
    hex::encode(&bytes[start..])
}
