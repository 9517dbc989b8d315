//! SoftHSM2 as the embedded default token: finding the module, writing an isolated
//! configuration, and running this program again with `SOFTHSM2_CONF` pointing at it.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once, when the module is initialised, and the variable cannot
//! be changed safely inside a running multi-threaded process. So a command that needs a
//! particular SoftHSM configuration re-runs itself as a child with the variable set.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::files::{Overwrite, write_atomic};

/// The SoftHSM2 module path, or an error that says how to install it.
pub fn module_path() -> anyhow::Result<PathBuf> {
    match hsmca_hsm::default_module_path() {
        Some(p) => Ok(p),
        None => bail!(
            "SoftHSM2 is not installed (no libsofthsm2.so found). Install the Debian/Ubuntu \
             package: `apt-get install softhsm2` (or run softhsm-setup/install.sh)"
        ),
    }
}

/// Writes a SoftHSM2 configuration at `conf` whose tokens live in `token_dir`.
pub fn write_config(conf: &Path, token_dir: &Path, overwrite: Overwrite) -> anyhow::Result<()> {
    let text = format!(
        "# SoftHSM2 configuration written by hsmca\n\
         directories.tokendir = {}\n\
         objectstore.backend = file\n\
         log.level = ERROR\n\
         slots.removable = false\n",
        token_dir.display()
    );
    write_atomic(conf, text.as_bytes(), 0o600, overwrite)
        .with_context(|| format!("writing {}", conf.display()))
}

/// True when this process already runs with `SOFTHSM2_CONF` naming `conf`.
pub fn env_points_at(conf: &Path) -> bool {
    let Some(current) = std::env::var_os("SOFTHSM2_CONF") else {
        return false;
    };
    match (Path::new(&current).canonicalize(), conf.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Set in the environment of a re-run child, so that a child never re-runs itself again (a
/// configuration that cannot be resolved would otherwise re-run the program without end).
const RERUN_ENV: &str = "HSMCA_RERUN_SOFTHSM2_CONF";

/// Replaces this process with this program run again with the same arguments and
/// `SOFTHSM2_CONF=conf`, so that signals (SIGTERM from a supervisor) reach the process that
/// does the work. Returns only when the exec failed, or when this process is itself such a
/// re-run (which would otherwise re-run without end).
pub fn exec_with_conf(conf: &Path) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    if let Some(previous) = std::env::var_os(RERUN_ENV) {
        return anyhow::anyhow!(
            "already re-run with SOFTHSM2_CONF={}, which is not {}; refusing to re-run again",
            Path::new(&previous).display(),
            conf.display()
        );
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return anyhow::Error::new(e).context("locating the hsmca executable"),
    };
    let err = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", conf)
        .env(RERUN_ENV, conf)
        .exec();
    anyhow::Error::new(err).context("re-running hsmca with the SoftHSM configuration")
}

/// Runs this program again with the same arguments and `SOFTHSM2_CONF=conf` (plus `extra`
/// variables), and returns its exit code. Refuses when this process is itself such a re-run.
pub fn rerun_with_conf(conf: &Path, extra: &[(&str, &str)]) -> anyhow::Result<i32> {
    if let Some(previous) = std::env::var_os(RERUN_ENV) {
        bail!(
            "already re-run with SOFTHSM2_CONF={}, which is not {}; refusing to re-run again",
            Path::new(&previous).display(),
            conf.display()
        );
    }
    let exe = std::env::current_exe().context("locating the hsmca executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env("SOFTHSM2_CONF", conf)
        .env(RERUN_ENV, conf);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let status = cmd
        .status()
        .context("re-running hsmca with the SoftHSM configuration")?;
    Ok(status.code().unwrap_or(1))
}
