//! Prometheus metrics, with istiod's names where they exist, served over plain HTTP.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds of the signing-latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

/// The CA's counters.
#[derive(Default, Debug)]
pub struct Metrics {
    /// Every CreateCertificate received.
    pub csr_count: AtomicU64,
    /// Requests refused by authentication.
    pub authentication_failure_count: AtomicU64,
    /// CSRs that did not parse or verify.
    pub csr_parsing_err_count: AtomicU64,
    /// Certificates issued.
    pub success_cert_issuance_count: AtomicU64,
    /// Signing failures (HSM, lint, post-check).
    pub csr_sign_err_count: AtomicU64,
    /// Requests refused for a lifetime or key type outside the policy defaults.
    pub out_of_bounds_count: AtomicU64,
    /// HSM errors.
    pub hsm_error_count: AtomicU64,
    /// Root notAfter, Unix seconds.
    pub root_cert_expiry: AtomicU64,
    /// Signing certificate notAfter, Unix seconds.
    pub cert_chain_expiry: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl Metrics {
    /// Adds one HSM signing latency.
    pub fn observe_signing(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counters: [(&str, &str, &AtomicU64); 7] = [
            (
                "citadel_server_csr_count",
                "The number of CSRs received by the CA server.",
                &self.csr_count,
            ),
            (
                "citadel_server_authentication_failure_count",
                "The number of authentication failures.",
                &self.authentication_failure_count,
            ),
            (
                "citadel_server_csr_parsing_err_count",
                "The number of errors occurred when parsing the CSR.",
                &self.csr_parsing_err_count,
            ),
            (
                "citadel_server_success_cert_issuance_count",
                "The number of certificates issuances that have succeeded.",
                &self.success_cert_issuance_count,
            ),
            (
                "citadel_server_csr_sign_err_count",
                "The number of errors occurred when signing the CSR.",
                &self.csr_sign_err_count,
            ),
            (
                "hsmca_out_of_bounds_request_count",
                "Requests refused for a lifetime or key type outside the policy defaults.",
                &self.out_of_bounds_count,
            ),
            (
                "hsmca_hsm_error_count",
                "Errors returned by the HSM.",
                &self.hsm_error_count,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        for (name, help, value) in [
            (
                "citadel_server_root_cert_expiry_timestamp",
                "The unix timestamp, in seconds, when the root cert will expire.",
                &self.root_cert_expiry,
            ),
            (
                "citadel_server_cert_chain_expiry_timestamp",
                "The unix timestamp, in seconds, when the CA signing cert will expire.",
                &self.cert_chain_expiry,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let name = "hsmca_signing_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time the HSM took to sign a certificate.\n# TYPE {name} histogram"
        );
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics ") {
                ("200 OK", metrics.render())
            } else {
                ("404 Not Found", "not found: try /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
