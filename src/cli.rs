//! The command line: `init`, `ceremony`, `keys`, `bench`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hsmca_hsm::{PinSource, TokenConfig};

use crate::state_dir::{InitOutcome, StateDir};

mod audit;
mod bench;
mod bench_grpc;
mod policy_check;

/// hsmca: a hardened, HSM-backed certificate authority for Istio meshes.
#[derive(Debug, Parser)]
#[command(name = "hsmca", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the embedded default in DIR: a SoftHSM2 token with a P-256 root and intermediate,
    /// and root-cert.pem, ca-cert.pem, cert-chain.pem. Does nothing when DIR is initialised.
    Init {
        /// The state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// Trust domain; the root's subject is O=<trust domain>, as istiod's.
        #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Run the Istio CA server from a configuration file (production mode).
    Serve {
        /// The server configuration (TOML; see examples/serve.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// The embedded default for a laptop: `init` DIR when needed, then serve with the
    /// Kubernetes JWT authenticator (when a kubeconfig is found) and client certificates.
    Dev(DevArgs),
    /// Test a policy without an HSM: print the decision, the rule and the certificate it would
    /// issue. Exit 0 when allowed, 3 when denied, 1 on error.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The node agent: Envoy SDS over a Unix socket with workload keys, CSRs and rotation.
    Agent(AgentArgs),
    /// Verify or search the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Production key ceremonies, each driven by one TOML file (see examples/).
    Ceremony {
        #[command(subcommand)]
        kind: Ceremony,
    },
    /// Inspect keys in a token.
    Keys {
        #[command(subcommand)]
        command: Keys,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: Bench,
    },
}

/// Options of `hsmca agent` (Istio's environment variable names set the same things).
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The CA, HOST:PORT.
    #[arg(long, env = "CA_ADDR")]
    ca_addr: String,
    /// The root the CA's serving certificate chains to (PEM).
    #[arg(long, env = "CA_ROOT_CA")]
    ca_root: PathBuf,
    /// The service-account token file (read for every request).
    #[arg(long, env = "TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The SDS Unix socket.
    #[arg(long, default_value = "./var/run/secrets/workload-spiffe-uds/socket")]
    sds_socket: PathBuf,
    /// Trust domain.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// The workload's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    namespace: String,
    /// The workload's service account.
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    /// Workload key: ecdsa-p256 (default) or rsa-2048. ECC_SIGNATURE_ALGORITHM=ECDSA also picks P-256.
    #[arg(long, env = "ECC_SIGNATURE_ALGORITHM", default_value = "ecdsa-p256")]
    key_type: String,
    /// Requested certificate lifetime.
    #[arg(long, env = "SECRET_TTL", default_value = "24h")]
    secret_ttl: String,
    /// Renew when this fraction of the lifetime has passed.
    #[arg(long, env = "SECRET_GRACE_PERIOD_RATIO", default_value_t = 0.5)]
    grace_ratio: f64,
    /// Cluster id sent as the `clusterid` header.
    #[arg(long, env = "ISTIO_META_CLUSTER_ID")]
    cluster_id: Option<String>,
    /// Extra trust anchors (PEM files) merged into ROOTCA.
    #[arg(long)]
    trust_anchor: Vec<PathBuf>,
    /// Also write key.pem, cert-chain.pem and root-cert.pem here, for applications without SDS.
    #[arg(long, env = "OUTPUT_CERTS")]
    output_certs: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every hash link and checkpoint signature. Exit 0 when intact; otherwise exit 1
    /// naming the file, line and record of the first problem.
    Verify {
        /// The audit directory (or one log file).
        path: PathBuf,
        /// The audit public key (PEM); default: `audit-key.pem` next to the audit directory.
        #[arg(long)]
        key: Option<PathBuf>,
        /// How many records after the last checkpoint are tolerated.
        #[arg(long, default_value_t = 1000)]
        max_unsealed: u64,
    },
    /// Find records.
    Show {
        /// The audit directory (or one log file).
        path: PathBuf,
        /// Records of this certificate serial (hex).
        #[arg(long)]
        serial: Option<String>,
        /// Records about this identity (SPIFFE ID).
        #[arg(long)]
        identity: Option<String>,
        /// Records at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only this decision: `allow` or `deny`.
        #[arg(long)]
        decision: Option<String>,
        /// Print the matching records as JSON lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Evaluate one request against a policy file.
    Check(PolicyCheckArgs),
}

/// Options of `hsmca policy check`.
#[derive(Debug, Args)]
pub struct PolicyCheckArgs {
    /// The policy file (TOML).
    #[arg(long)]
    policy: PathBuf,
    /// The caller: `AUTHENTICATOR:CLUSTER/NAMESPACE/SERVICE_ACCOUNT`, e.g. `kube-jwt:cluster1/foo/httpbin`.
    #[arg(long)]
    caller: String,
    /// A CSR (PEM) to take the key type and requested SANs from.
    #[arg(long)]
    csr: Option<PathBuf>,
    /// Key type when no CSR is given.
    #[arg(long, default_value = "ecdsa-p256")]
    key_type: String,
    /// Requested lifetime (`validity_duration`), e.g. `1h`.
    #[arg(long)]
    ttl: Option<String>,
}

/// Options of `hsmca dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// The state directory (created and initialised when needed).
    #[arg(long)]
    state_dir: PathBuf,
    /// TLS listen address.
    #[arg(long, default_value = "127.0.0.1:15012")]
    listen: String,
    /// Prometheus metrics address.
    #[arg(long, default_value = "127.0.0.1:15014")]
    metrics_listen: String,
    /// Also serve plaintext gRPC here, for local debugging (no caller is authenticated there).
    #[arg(long)]
    plaintext_listen: Option<String>,
    /// Kubeconfig for TokenReviews (default: KUBECONFIG, then ~/.kube/config when present).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Trust domain.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Policy file (default: Istio's behaviour).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Per-identity rate limit, requests per second (default: none).
    #[arg(long)]
    rate_limit: Option<f64>,
    /// Accept JWTs from this OIDC issuer (for workloads outside Kubernetes), with --jwt-jwks.
    #[arg(long, requires = "jwt_jwks")]
    jwt_issuer: Option<String>,
    /// The issuer's JWKS file.
    #[arg(long, requires = "jwt_issuer")]
    jwt_jwks: Option<PathBuf>,
    /// Audiences accepted from that issuer.
    #[arg(long, default_value = "istio-ca")]
    jwt_audience: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Ceremony {
    /// Generate a root key (optionally) and a self-signed root certificate.
    Root {
        /// Ceremony config (TOML).
        config: PathBuf,
    },
    /// Generate an intermediate key (optionally) and sign its certificate with a root key.
    Intermediate {
        /// Ceremony config (TOML).
        config: PathBuf,
    },
    /// Make a PKCS#10 CSR for a token key, for an offline or third-party root.
    Csr {
        /// Ceremony config (TOML).
        config: PathBuf,
    },
    /// Import the certificate and chain issued for a token key.
    Import {
        /// Ceremony config (TOML).
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum Keys {
    /// List the private keys of a token with their security attributes.
    List(TokenArgs),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Raw token signing per second, P-256 and RSA-2048, 1 and N sessions, on a fresh
    /// temporary SoftHSM2 token.
    Hsm {
        /// Seconds per case.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Sessions (and threads) for the parallel case; default: the number of cores.
        #[arg(long)]
        sessions: Option<usize>,
    },
    /// Signing throughput of an existing key (for example through p11-kit), for each session
    /// count given.
    Sign(bench::SignArgs),
    /// Single-core verification rates of the CSR signature checks (the unavoidable crypto).
    Crypto {
        /// Seconds per case.
        #[arg(long, default_value_t = 2)]
        seconds: u64,
    },
    /// End-to-end CreateCertificate load over gRPC/TLS.
    Grpc(bench_grpc::GrpcArgs),
}

/// Which token: an hsmca state directory, or module + label + PIN source.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Use the token of an hsmca state directory.
    #[arg(long, conflicts_with_all = ["module", "token"])]
    state_dir: Option<PathBuf>,
    /// PKCS#11 module path (default: the system SoftHSM2).
    #[arg(long)]
    module: Option<PathBuf>,
    /// Token label.
    #[arg(long)]
    token: Option<String>,
    /// File holding the user PIN.
    #[arg(long, conflicts_with = "pin_env")]
    pin_file: Option<PathBuf>,
    /// Environment variable holding the user PIN.
    #[arg(long)]
    pin_env: Option<String>,
}

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Init {
            state_dir,
            trust_domain,
        } => {
            let dir = StateDir::new(&state_dir);
            match dir.init(&trust_domain)? {
                InitOutcome::AlreadyInitialised => println!(
                    "{} is already initialised; nothing changed",
                    state_dir.display()
                ),
                InitOutcome::Created if std::env::var_os("HSMCA_INIT_STAGING").is_some() => {}
                InitOutcome::Created => {
                    println!("initialised {}:", state_dir.display());
                    println!(
                        "  SoftHSM2 token {:?} ({})",
                        crate::state_dir::TOKEN_LABEL,
                        dir.token_dir().display()
                    );
                    println!(
                        "  keys {:?} and {:?}: ECDSA P-256, sensitive, never extractable",
                        crate::state_dir::ROOT_KEY,
                        crate::state_dir::INTERMEDIATE_KEY
                    );
                    println!("  user PIN in {} (mode 0600)", dir.pin_file().display());
                    println!("  root-cert.pem, ca-cert.pem, cert-chain.pem");
                }
            }
            Ok(0)
        }
        Command::Serve { config } => {
            let settings = crate::server::Settings::load(&config)?;
            runtime()?.block_on(crate::server::serve(settings))?;
            Ok(0)
        }
        Command::Dev(args) => dev(args),
        Command::Policy {
            command: PolicyCommand::Check(args),
        } => policy_check::run(&args),
        Command::Audit { command } => audit::run(command),
        Command::Agent(args) => {
            let ttl = hsmca_policy::parse_duration(&args.secret_ttl).context("--secret-ttl")?;
            if !(0.0..=1.0).contains(&args.grace_ratio) {
                anyhow::bail!("--grace-ratio must be between 0 and 1");
            }
            let key_type = args
                .key_type
                .parse()
                .map_err(|e: String| anyhow::anyhow!("--key-type: {e}"))?;
            let cfg = crate::agent::AgentConfig {
                ca_addr: args.ca_addr,
                ca_root: args.ca_root,
                token_file: args.token_file,
                sds_socket: args.sds_socket,
                trust_domain: args.trust_domain,
                namespace: args.namespace,
                service_account: args.service_account,
                key_type,
                ttl,
                grace_ratio: args.grace_ratio,
                cluster_id: args.cluster_id,
                extra_roots: args.trust_anchor,
                output_certs: args.output_certs,
            };
            runtime()?.block_on(crate::agent::run(cfg))?;
            Ok(0)
        }
        Command::Ceremony { kind } => {
            match kind {
                Ceremony::Root { config } => crate::ceremony::root(&config)?,
                Ceremony::Intermediate { config } => crate::ceremony::intermediate(&config)?,
                Ceremony::Csr { config } => crate::ceremony::csr(&config)?,
                Ceremony::Import { config } => crate::ceremony::import(&config)?,
            }
            Ok(0)
        }
        Command::Keys {
            command: Keys::List(args),
        } => keys_list(&args),
        Command::Bench {
            command: Bench::Hsm { seconds, sessions },
        } => bench::hsm(Duration::from_secs(seconds), sessions),
        Command::Bench {
            command: Bench::Sign(args),
        } => bench::sign(&args),
        Command::Bench {
            command: Bench::Crypto { seconds },
        } => bench::crypto(Duration::from_secs(seconds)),
        Command::Bench {
            command: Bench::Grpc(args),
        } => runtime()?.block_on(bench_grpc::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn dev(args: DevArgs) -> anyhow::Result<i32> {
    let dir = StateDir::new(&args.state_dir);
    if !dir.is_initialised() || std::env::var_os("HSMCA_INIT_STAGING").is_some() {
        dir.init(&args.trust_domain)?;
        if std::env::var_os("HSMCA_INIT_STAGING").is_some() {
            return Ok(0);
        }
        println!("hsmca: initialised {}", args.state_dir.display());
    }
    dir.ensure_conf_env()?;
    let kubeconfig = args
        .kubeconfig
        .clone()
        .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from))
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".kube/config"))
                .filter(|p| p.exists())
        });
    if kubeconfig.is_none() {
        tracing::info!("no kubeconfig found: the Kubernetes JWT authenticator is off");
    }
    let file = crate::server::config::FileConfig {
        listen: Some(args.listen),
        plaintext_listen: args.plaintext_listen,
        metrics_listen: Some(args.metrics_listen),
        trust_domain: Some(args.trust_domain),
        policy: args.policy.map(|p| std::path::absolute(&p).unwrap_or(p)),
        server_dns_names: Some(vec!["istiod.istio-system.svc".into(), "localhost".into()]),
        server_ips: Some(vec!["127.0.0.1".into()]),
        hsm: crate::server::config::HsmSection {
            token_label: crate::state_dir::TOKEN_LABEL.into(),
            key_label: crate::state_dir::INTERMEDIATE_KEY.into(),
            pin_file: Some(dir.pin_file()),
            ..Default::default()
        },
        ca: crate::server::config::CaSection {
            dir: args.state_dir.clone(),
        },
        authn: crate::server::config::AuthnSection {
            kube_jwt: kubeconfig.is_some(),
            kubeconfig,
            jwt: match (args.jwt_issuer, args.jwt_jwks) {
                (Some(issuer), Some(jwks)) => vec![crate::server::config::JwtSection {
                    issuer,
                    audiences: args.jwt_audience,
                    jwks_file: std::path::absolute(&jwks).unwrap_or(jwks),
                }],
                _ => Vec::new(),
            },
            ..Default::default()
        },
        limits: crate::server::config::LimitsSection {
            per_identity_rate: args.rate_limit,
            per_identity_burst: None,
        },
        audit: Some(crate::server::config::AuditSection {
            dir: dir.audit_dir(),
            key_label: crate::state_dir::AUDIT_KEY.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    dir.ensure_audit_key()?;
    let settings = crate::server::Settings::from_file(file, std::path::Path::new("."))?;
    runtime()?.block_on(crate::server::serve(settings))?;
    Ok(0)
}

fn token_config(args: &TokenArgs) -> anyhow::Result<(TokenConfig, Option<StateDir>)> {
    if let Some(dir) = &args.state_dir {
        let dir = StateDir::new(dir);
        return Ok((dir.token_config()?, Some(dir)));
    }
    let label = args
        .token
        .clone()
        .context("give --state-dir, or --token with --pin-file or --pin-env")?;
    let pin = match (&args.pin_file, &args.pin_env) {
        (Some(f), _) => PinSource::File(f.clone()),
        (None, Some(v)) => PinSource::Env(v.clone()),
        (None, None) => anyhow::bail!("give --pin-file or --pin-env"),
    };
    let module = match &args.module {
        Some(m) => m.clone(),
        None => crate::softhsm::module_path()?,
    };
    Ok((TokenConfig { module, label, pin }, None))
}

fn keys_list(args: &TokenArgs) -> anyhow::Result<i32> {
    let (config, state) = token_config(args)?;
    if let Some(state) = state {
        state.ensure_conf_env()?;
    }
    let token = config.open()?;
    let keys = token.list_keys()?;
    println!(
        "{:<24} {:<34} {:<11} {:>9} {:>11} {:>16} {:>17} {:>5}  verdict",
        "LABEL",
        "ID",
        "ALGORITHM",
        "SENSITIVE",
        "EXTRACTABLE",
        "ALWAYS_SENSITIVE",
        "NEVER_EXTRACTABLE",
        "LOCAL"
    );
    for k in &keys {
        let s = &k.security;
        let problems = s.problems();
        println!(
            "{:<24} {:<34} {:<11} {:>9} {:>11} {:>16} {:>17} {:>5}  {}",
            k.label,
            hex::encode(&k.id),
            k.algorithm.map_or("unknown".to_string(), |a| a.to_string()),
            s.sensitive,
            s.extractable,
            s.always_sensitive,
            s.never_extractable,
            s.local,
            if problems.is_empty() {
                "protected".to_string()
            } else {
                format!("INSECURE: {}", problems.join("; "))
            }
        );
    }
    if keys.is_empty() {
        println!("(no private keys in token {:?})", token.label());
    }
    Ok(0)
}

/// Runs `work`, showing a ticking progress line on a terminal while it takes.
pub fn with_progress<T>(what: &str, work: impl FnOnce() -> T) -> T {
    if !std::io::stderr().is_terminal() {
        return work();
    }
    let done = Arc::new(AtomicBool::new(false));
    let ticker = {
        let done = done.clone();
        let what = what.to_owned();
        std::thread::spawn(move || {
            let start = Instant::now();
            let frames = ['|', '/', '-', '\\'];
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                eprint!(
                    "\r{} {what}... {:.1}s",
                    frames[i % 4],
                    start.elapsed().as_secs_f64()
                );
                i += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("\r  {what}: done in {:.1}s", start.elapsed().as_secs_f64());
        })
    };
    let out = work();
    done.store(true, Ordering::Relaxed);
    let _ = ticker.join();
    out
}
