//! `hsmca bench hsm`: raw token signing throughput on a fresh temporary SoftHSM2 token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hsmca_hsm::{HsmSigner, KeyAlgorithm, Module, Pin, Signer, SignerOptions};

use crate::files::Overwrite;
use crate::softhsm;

const STAGE_ENV: &str = "HSMCA_BENCH_TOKEN_DIR";

/// Runs the benchmark; in the parent, makes the temporary token directory and re-runs itself.
pub fn hsm(per_case: Duration, sessions: Option<usize>) -> anyhow::Result<i32> {
    if std::env::var_os(STAGE_ENV).is_none() {
        let tmp = tempfile::tempdir()?;
        std::fs::create_dir(tmp.path().join("tokens"))?;
        let conf = tmp.path().join("softhsm2.conf");
        softhsm::write_config(&conf, &tmp.path().join("tokens"), Overwrite::Never)?;
        return softhsm::rerun_with_conf(&conf, &[(STAGE_ENV, &tmp.path().to_string_lossy())]);
    }
    let module = Module::load(&softhsm::module_path()?)?;
    let pin = Pin::new("bench-pin".into());
    module.init_token("bench", &Pin::new("bench-so".into()), &pin)?;
    let token = module.open_token("bench", pin)?;
    let parallel =
        sessions.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    println!(
        "token signing, {}s per case, {} cores",
        per_case.as_secs(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "{:<11} {:>8} {:>14} {:>20}",
        "algorithm", "sessions", "raw C_Sign/s", "verified sign/s"
    );
    for algorithm in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Rsa2048] {
        let label = format!("bench-{algorithm}");
        token.generate_key(&label, algorithm)?;
        let mut counts = vec![1];
        if parallel > 1 {
            counts.push(parallel);
        }
        for n in counts {
            let signer = Arc::new(HsmSigner::open(
                token.clone(),
                &label,
                &SignerOptions {
                    sessions: n,
                    allow_insecure_key: false,
                },
            )?);
            let raw = measure(&signer, n, per_case, true)?;
            let verified = measure(&signer, n, per_case, false)?;
            println!(
                "{:<11} {:>8} {:>14.0} {:>20.0}",
                algorithm.name(),
                n,
                raw,
                verified
            );
        }
    }
    Ok(0)
}

fn measure(
    signer: &Arc<HsmSigner>,
    threads: usize,
    per_case: Duration,
    raw: bool,
) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let signer = signer.clone();
            let count = count.clone();
            std::thread::spawn(move || -> hsmca_hsm::Result<()> {
                let mut msg = [0u8; 512];
                msg[0] = t as u8;
                let mut i: u64 = 0;
                while start.elapsed() < per_case {
                    msg[8..16].copy_from_slice(&i.to_le_bytes());
                    if raw {
                        signer.sign_raw(&msg)?;
                    } else {
                        signer.sign(&msg)?;
                    }
                    i += 1;
                }
                count.fetch_add(i, Ordering::Relaxed);
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Options of `hsmca bench sign`.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// PKCS#11 module (default: the system SoftHSM2; p11-kit-client.so for a network HSM).
    #[arg(long)]
    module: Option<std::path::PathBuf>,
    /// Token label.
    #[arg(long)]
    token: String,
    /// Environment variable holding the PIN.
    #[arg(long, conflicts_with = "pin_file")]
    pin_env: Option<String>,
    /// File holding the PIN.
    #[arg(long)]
    pin_file: Option<std::path::PathBuf>,
    /// Key label.
    #[arg(long)]
    key: String,
    /// Session counts to measure, comma separated.
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    sessions: Vec<usize>,
    /// Seconds per case.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

/// `hsmca bench sign`: one JSON line per session count.
pub fn sign(args: &SignArgs) -> anyhow::Result<i32> {
    let pin = match (&args.pin_env, &args.pin_file) {
        (Some(v), _) => hsmca_hsm::PinSource::Env(v.clone()),
        (None, Some(f)) => hsmca_hsm::PinSource::File(f.clone()),
        _ => anyhow::bail!("give --pin-env or --pin-file"),
    };
    let module = match &args.module {
        Some(m) => m.clone(),
        None => softhsm::module_path()?,
    };
    let token = hsmca_hsm::TokenConfig {
        module,
        label: args.token.clone(),
        pin,
    }
    .open()?;
    for &n in &args.sessions {
        let signer = Arc::new(HsmSigner::open(
            token.clone(),
            &args.key,
            &SignerOptions {
                sessions: n,
                allow_insecure_key: false,
            },
        )?);
        let raw = measure(&signer, n, Duration::from_secs(args.seconds), true)?;
        let verified = measure(&signer, n, Duration::from_secs(args.seconds), false)?;
        println!(
            "{}",
            serde_json::json!({"sessions": n, "algorithm": signer.algorithm().name(), "raw_sign_per_s": raw, "verified_sign_per_s": verified})
        );
    }
    Ok(0)
}

/// `hsmca bench crypto`: single-core rates of the checks every certificate needs.
pub fn crypto(per_case: Duration) -> anyhow::Result<i32> {
    use crate::agent::workload_key::{WorkloadKeyType, generate};
    let mut out = serde_json::Map::new();
    for (name, kind) in [
        ("ecdsa-p256", WorkloadKeyType::EcdsaP256),
        ("rsa-2048", WorkloadKeyType::Rsa2048),
    ] {
        let key = generate(kind, "spiffe://cluster.local/ns/bench/sa/x")?;
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < per_case {
            crate::issuance::check_csr(&key.csr_pem)?;
            n += 1;
        }
        out.insert(
            format!("csr_check_per_s_1core_{name}"),
            (n as f64 / start.elapsed().as_secs_f64()).into(),
        );
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(0)
}
