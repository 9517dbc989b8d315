//! `hsmca serve --config FILE`: the TOML configuration, Istio's environment overrides, and the
//! checked settings the server runs with.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use hsmca_hsm::{PinSource, TokenConfig};
use serde::Deserialize;

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// TLS listen address (default `0.0.0.0:15012`).
    pub listen: Option<String>,
    /// Plaintext listen address, for local debugging only; callers there are never authenticated.
    pub plaintext_listen: Option<String>,
    /// Prometheus metrics address (default `127.0.0.1:15014`).
    pub metrics_listen: Option<String>,
    /// Trust domain (`TRUST_DOMAIN`, default `cluster.local`).
    pub trust_domain: Option<String>,
    /// Default workload lifetime (`DEFAULT_WORKLOAD_CERT_TTL`, default `24h`).
    pub default_workload_cert_ttl: Option<String>,
    /// Maximum workload lifetime (`MAX_WORKLOAD_CERT_TTL`, default `90d`).
    pub max_workload_cert_ttl: Option<String>,
    /// DNS names of the server certificate (default `["istiod.istio-system.svc"]`).
    pub server_dns_names: Option<Vec<String>>,
    /// IP addresses of the server certificate.
    pub server_ips: Option<Vec<String>>,
    /// Lifetime of the server certificate (default `24h`; renewed at half).
    pub server_cert_lifetime: Option<String>,
    /// Policy file (TOML); default: Istio's behaviour (identity SAN only, 24h, 90d max).
    pub policy: Option<PathBuf>,
    /// The token and key.
    pub hsm: HsmSection,
    /// The CA files.
    pub ca: CaSection,
    /// Authentication.
    #[serde(default)]
    pub authn: AuthnSection,
    /// The audit log.
    pub audit: Option<AuditSection>,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsSection,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Sustained CreateCertificate requests per second per identity (default: no limit).
    pub per_identity_rate: Option<f64>,
    /// Burst per identity (default: 10 × the rate, at least 1).
    pub per_identity_burst: Option<f64>,
}

/// `[audit]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Directory of the log files.
    pub dir: PathBuf,
    /// Label of the audit key in the same token (checkpoints are signed with it).
    pub key_label: String,
    /// Seal at least every this many records (default 64).
    pub checkpoint_every: Option<u64>,
    /// Seal at least this often while records are unsealed (default `2s`).
    pub checkpoint_interval: Option<String>,
    /// Start a new file above this many MiB (default 64).
    pub max_file_mib: Option<u64>,
    /// Switch auditing off (only for benchmarks: the CA then issues unrecorded certificates).
    #[serde(default)]
    pub disabled: bool,
}

/// Checked audit settings.
#[derive(Debug, Clone)]
pub struct AuditSettings {
    /// Directory.
    pub dir: PathBuf,
    /// Audit key label.
    pub key_label: String,
    /// Writer options.
    pub options: crate::audit::AuditOptions,
}

/// `[hsm]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HsmSection {
    /// PKCS#11 module (default: the system SoftHSM2).
    pub module: Option<PathBuf>,
    /// Token label.
    pub token_label: String,
    /// Signing key label.
    pub key_label: String,
    /// PIN file (mode 0600).
    pub pin_file: Option<PathBuf>,
    /// PIN environment variable.
    pub pin_env: Option<String>,
    /// Signing sessions (default: number of cores).
    pub sessions: Option<usize>,
    /// Use a key that is or was extractable. Logged loudly at every start.
    #[serde(default)]
    pub allow_insecure_key: bool,
}

/// `[ca]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSection {
    /// Directory with `root-cert.pem`, `ca-cert.pem`, `cert-chain.pem`.
    pub dir: PathBuf,
}

/// `[authn]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthnSection {
    /// Accept client certificates issued by this CA (default true).
    #[serde(default = "yes")]
    pub client_cert: bool,
    /// Accept Kubernetes service-account tokens (default true).
    #[serde(default = "yes")]
    pub kube_jwt: bool,
    /// Audiences (`TOKEN_AUDIENCES`, default `["istio-ca"]`).
    pub token_audiences: Option<Vec<String>>,
    /// This cluster's id (`CLUSTER_ID`, default `Kubernetes`).
    pub cluster_id: Option<String>,
    /// Kubeconfig of the local cluster; default: `KUBECONFIG`, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Remote clusters: id → kubeconfig.
    #[serde(default)]
    pub clusters: BTreeMap<String, PathBuf>,
    /// `<ns>/<sa>` allowed to impersonate (`CA_TRUSTED_NODE_ACCOUNTS`).
    pub trusted_node_accounts: Option<Vec<String>>,
    /// Longest reuse of a positive TokenReview (default `60s`).
    pub token_review_cache: Option<String>,
    /// OIDC issuers for workloads outside Kubernetes (Istio's `JWT_RULE`).
    #[serde(default)]
    pub jwt: Vec<JwtSection>,
}

/// `[[authn.jwt]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    /// The `iss` of accepted tokens.
    pub issuer: String,
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// The issuer's JWKS (JSON), re-read when it changes.
    pub jwks_file: PathBuf,
}

fn yes() -> bool {
    true
}

impl Default for AuthnSection {
    fn default() -> Self {
        AuthnSection {
            client_cert: true,
            kube_jwt: true,
            token_audiences: None,
            cluster_id: None,
            kubeconfig: None,
            clusters: BTreeMap::new(),
            trusted_node_accounts: None,
            token_review_cache: None,
            jwt: Vec::new(),
        }
    }
}

/// Where the local cluster's Kubernetes API is.
#[derive(Debug, Clone)]
pub enum KubeSource {
    /// A kubeconfig file.
    File(PathBuf),
    /// `KUBECONFIG` or the in-cluster service account.
    Infer,
}

/// The checked settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// TLS listen address.
    pub listen: SocketAddr,
    /// Plaintext listen address.
    pub plaintext_listen: Option<SocketAddr>,
    /// Metrics address.
    pub metrics_listen: Option<SocketAddr>,
    /// Trust domain.
    pub trust_domain: String,
    /// Default lifetime.
    pub default_ttl: Duration,
    /// Maximum lifetime.
    pub max_ttl: Duration,
    /// Server certificate DNS names.
    pub server_dns: Vec<String>,
    /// Server certificate IPs.
    pub server_ips: Vec<IpAddr>,
    /// Server certificate lifetime.
    pub server_cert_lifetime: Duration,
    /// Policy file.
    pub policy: Option<PathBuf>,
    /// The token.
    pub token: TokenConfig,
    /// Signing key label.
    pub key_label: String,
    /// Sessions.
    pub sessions: usize,
    /// Insecure key override.
    pub allow_insecure_key: bool,
    /// CA files directory.
    pub ca_dir: PathBuf,
    /// Client certificates accepted.
    pub client_cert: bool,
    /// Kubernetes JWT accepted, from this API.
    pub kube: Option<KubeSource>,
    /// Remote clusters.
    pub clusters: BTreeMap<String, PathBuf>,
    /// Audiences.
    pub audiences: Vec<String>,
    /// Local cluster id.
    pub cluster_id: String,
    /// Trusted node accounts.
    pub trusted_node_accounts: Vec<String>,
    /// OIDC issuers.
    pub jwt_rules: Vec<crate::authn::JwtRule>,
    /// TokenReview cache limit.
    pub token_review_cache: Duration,
    /// The audit log (`None`: off).
    pub audit: Option<AuditSettings>,
    /// Per-identity rate limit.
    pub rate_limit: Option<super::rate_limit::Limit>,
}

fn dur(key: &str, value: &str) -> anyhow::Result<Duration> {
    hsmca_policy::parse_duration(value).map_err(|e| anyhow::anyhow!("{key}: {e}"))
}

fn addr(key: &str, value: &str) -> anyhow::Result<SocketAddr> {
    value
        .parse()
        .map_err(|e| anyhow::anyhow!("{key}: {value:?} is not HOST:PORT ({e})"))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

impl Settings {
    /// Reads and checks a configuration file; Istio's environment variables override it.
    pub fn load(path: &Path) -> anyhow::Result<Settings> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file: FileConfig =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Settings::from_file(file, base).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
    }

    /// Checks a parsed configuration; relative paths are taken from `base`.
    pub fn from_file(f: FileConfig, base: &Path) -> anyhow::Result<Settings> {
        let trust_domain = env("TRUST_DOMAIN")
            .or(f.trust_domain)
            .unwrap_or_else(|| "cluster.local".into())
            .replace('@', ".");
        hsmca_policy::SpiffeId::parse(&format!("spiffe://{trust_domain}"))
            .map_err(|e| anyhow::anyhow!("trust_domain: {e}"))?;
        let default_ttl = match env("DEFAULT_WORKLOAD_CERT_TTL") {
            Some(v) => dur("DEFAULT_WORKLOAD_CERT_TTL", &v)?,
            None => dur(
                "default_workload_cert_ttl",
                f.default_workload_cert_ttl.as_deref().unwrap_or("24h"),
            )?,
        };
        let max_ttl = match env("MAX_WORKLOAD_CERT_TTL") {
            Some(v) => dur("MAX_WORKLOAD_CERT_TTL", &v)?,
            None => dur(
                "max_workload_cert_ttl",
                f.max_workload_cert_ttl.as_deref().unwrap_or("90d"),
            )?,
        };
        if default_ttl.is_zero() || default_ttl > max_ttl {
            bail!("default_workload_cert_ttl must be positive and at most max_workload_cert_ttl");
        }
        let pin = match (&f.hsm.pin_file, &f.hsm.pin_env) {
            (Some(p), None) => PinSource::File(base.join(p)),
            (None, Some(v)) => PinSource::Env(v.clone()),
            _ => bail!("hsm: set exactly one of pin_file and pin_env"),
        };
        let module = match &f.hsm.module {
            Some(m) => base.join(m),
            None => crate::softhsm::module_path()?,
        };
        if f.hsm.token_label.is_empty() || f.hsm.key_label.is_empty() {
            bail!("hsm: token_label and key_label are required");
        }
        let sessions = f
            .hsm
            .sessions
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        if sessions == 0 || sessions > 1024 {
            bail!("hsm.sessions: {sessions} is not between 1 and 1024");
        }
        let server_ips = f
            .server_ips
            .unwrap_or_default()
            .iter()
            .map(|ip| {
                ip.parse()
                    .map_err(|_| anyhow::anyhow!("server_ips: {ip:?} is not an IP address"))
            })
            .collect::<anyhow::Result<Vec<IpAddr>>>()?;
        let audit = match f.audit {
            None => bail!(
                "[audit] is required: dir and key_label (set disabled = true only for benchmarks)"
            ),
            Some(a) if a.disabled => None,
            Some(a) => {
                let d = crate::audit::AuditOptions::default();
                Some(AuditSettings {
                    dir: base.join(&a.dir),
                    key_label: a.key_label,
                    options: crate::audit::AuditOptions {
                        checkpoint_every: a.checkpoint_every.unwrap_or(d.checkpoint_every).max(1),
                        checkpoint_interval: match &a.checkpoint_interval {
                            Some(v) => dur("audit.checkpoint_interval", v)?,
                            None => d.checkpoint_interval,
                        },
                        max_file_bytes: a
                            .max_file_mib
                            .map_or(d.max_file_bytes, |m| m.max(1) * 1024 * 1024),
                    },
                })
            }
        };
        let rate_limit = match f.limits.per_identity_rate {
            None => None,
            Some(rate) if rate > 0.0 && rate.is_finite() => {
                let burst = f
                    .limits
                    .per_identity_burst
                    .unwrap_or((rate * 10.0).max(1.0));
                if !(burst >= 1.0 && burst.is_finite()) {
                    bail!("limits.per_identity_burst must be at least 1");
                }
                Some(super::rate_limit::Limit { rate, burst })
            }
            Some(_) => bail!("limits.per_identity_rate must be a positive number"),
        };
        let a = f.authn;
        let audiences = env("TOKEN_AUDIENCES")
            .map(|v| list(&v))
            .or(a.token_audiences)
            .unwrap_or_else(|| vec!["istio-ca".into()]);
        if audiences.is_empty() {
            bail!("authn.token_audiences: give at least one audience");
        }
        let trusted_node_accounts = env("CA_TRUSTED_NODE_ACCOUNTS")
            .map(|v| list(&v))
            .or(a.trusted_node_accounts)
            .unwrap_or_default();
        for acct in &trusted_node_accounts {
            if acct.split('/').count() != 2 || acct.split('/').any(str::is_empty) {
                bail!("trusted_node_accounts: {acct:?} is not <namespace>/<service-account>");
            }
        }
        let kube = a.kube_jwt.then(|| match &a.kubeconfig {
            Some(p) => KubeSource::File(base.join(p)),
            None => KubeSource::Infer,
        });
        let mut jwt_rules = Vec::new();
        for j in &a.jwt {
            if j.issuer.is_empty() || j.audiences.is_empty() {
                bail!("authn.jwt: issuer and at least one audience are required");
            }
            jwt_rules.push(crate::authn::JwtRule {
                issuer: j.issuer.clone(),
                audiences: j.audiences.clone(),
                jwks_file: base.join(&j.jwks_file),
            });
        }
        if !a.client_cert && kube.is_none() && jwt_rules.is_empty() {
            bail!("authn: enable at least one of client_cert, kube_jwt and jwt");
        }
        Ok(Settings {
            listen: addr("listen", f.listen.as_deref().unwrap_or("0.0.0.0:15012"))?,
            plaintext_listen: f
                .plaintext_listen
                .as_deref()
                .map(|v| addr("plaintext_listen", v))
                .transpose()?,
            metrics_listen: Some(addr(
                "metrics_listen",
                f.metrics_listen.as_deref().unwrap_or("127.0.0.1:15014"),
            )?),
            trust_domain,
            default_ttl,
            max_ttl,
            server_dns: f
                .server_dns_names
                .unwrap_or_else(|| vec!["istiod.istio-system.svc".into()]),
            server_ips,
            server_cert_lifetime: dur(
                "server_cert_lifetime",
                f.server_cert_lifetime.as_deref().unwrap_or("24h"),
            )?,
            policy: f.policy.map(|p| base.join(p)),
            token: TokenConfig {
                module,
                label: f.hsm.token_label,
                pin,
            },
            key_label: f.hsm.key_label,
            sessions,
            allow_insecure_key: f.hsm.allow_insecure_key,
            ca_dir: base.join(f.ca.dir),
            client_cert: a.client_cert,
            kube,
            clusters: a
                .clusters
                .into_iter()
                .map(|(k, v)| (k, base.join(v)))
                .collect(),
            audiences,
            cluster_id: env("CLUSTER_ID")
                .or(a.cluster_id)
                .unwrap_or_else(|| "Kubernetes".into()),
            trusted_node_accounts,
            jwt_rules,
            audit,
            rate_limit,
            token_review_cache: dur(
                "token_review_cache",
                a.token_review_cache.as_deref().unwrap_or("60s"),
            )?,
        })
    }
}
