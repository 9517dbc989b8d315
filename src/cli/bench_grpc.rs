//! `hsmca bench grpc`: end-to-end CreateCertificate load over gRPC/TLS, as a client would
//! see it: requests per second and latency percentiles at a given concurrency.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hsmca_proto::{IstioCertificateRequest, IstioCertificateServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::agent::workload_key::{WorkloadKeyType, generate};

/// Options of `hsmca bench grpc`.
#[derive(Debug, clap::Args)]
pub struct GrpcArgs {
    /// The CA, HOST:PORT.
    #[arg(long)]
    addr: String,
    /// Root the CA's serving certificate chains to.
    #[arg(long)]
    ca_root: PathBuf,
    /// File with the bearer token.
    #[arg(long)]
    token_file: PathBuf,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Total requests.
    #[arg(long, default_value_t = 10_000)]
    requests: u64,
    /// Requests sent first and not measured.
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// CSR key type: ecdsa-p256 or rsa-2048.
    #[arg(long, default_value = "ecdsa-p256")]
    csr_key: String,
    /// TLS connections the requests are spread over (HTTP/2 streams share each).
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

async fn channel(addr: &str, root: &str) -> anyhow::Result<Channel> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name(host),
        )?
        .connect()
        .await?)
}

/// Runs the load; returns the exit code (1 when any request failed).
pub async fn run(args: GrpcArgs) -> anyhow::Result<i32> {
    let root = std::fs::read_to_string(&args.ca_root)?;
    let token = std::fs::read_to_string(&args.token_file)?.trim().to_owned();
    let kind: WorkloadKeyType = args
        .csr_key
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;
    // A pool of distinct CSRs, made before the clock starts.
    let csrs: Arc<Vec<String>> = Arc::new(
        tokio::task::spawn_blocking(move || {
            (0..32)
                .map(|_| {
                    generate(kind, "spiffe://cluster.local/ns/bench/sa/load").map(|k| k.csr_pem)
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await??,
    );
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(channel(&args.addr, &root).await?);
    }
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse()?;
    let issue = {
        let header = header.clone();
        move |ch: Channel, csr: String| {
            let header = header.clone();
            async move {
                let mut req = tonic::Request::new(IstioCertificateRequest {
                    csr,
                    validity_duration: 3600,
                    metadata: None,
                });
                req.metadata_mut().insert("authorization", header);
                IstioCertificateServiceClient::new(ch)
                    .create_certificate(req)
                    .await
            }
        }
    };
    // Warm-up: TLS sessions, the TokenReview cache, the server's pools.
    for i in 0..args.warmup {
        issue(
            channels[i as usize % channels.len()].clone(),
            csrs[i as usize % csrs.len()].clone(),
        )
        .await?;
    }
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let (next, errors, csrs) = (next.clone(), errors.clone(), csrs.clone());
        let ch = channels[w % channels.len()].clone();
        let issue = issue.clone();
        let total = args.requests;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                match issue(ch.clone(), csrs[i as usize % csrs.len()].clone()).await {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("request failed: {:?}: {}", e.code(), e.message());
                        }
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for w in workers {
        latencies.extend(w.await?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let ok = latencies.len() as f64;
    let errors = errors.load(Ordering::Relaxed);
    let result = serde_json::json!({
        "concurrency": args.concurrency,
        "csr_key": args.csr_key,
        "requests": args.requests,
        "errors": errors,
        "seconds": elapsed,
        "create_certificate_per_s": ok / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
    });
    if args.json {
        println!("{result}");
    } else {
        println!(
            "{} {} at concurrency {}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} errors",
            args.requests,
            args.csr_key,
            args.concurrency,
            ok / elapsed,
            pct(0.5),
            pct(0.99),
            errors
        );
    }
    Ok(if errors > 0 { 1 } else { 0 })
}
