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
