//! Helpers for the command-line tests: running `hsmca` and the tools that check its output
//! independently (openssl, pkcs11-tool, pkilint's lint_pkix_cert).
//!
//! A missing tool skips its check with a message, unless `HSMCA_REQUIRE_TOOLS=1` (as in CI),
//! where the test fails instead.
#![allow(dead_code, unused_imports)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../support/tools.rs"]
mod tools;
pub use tools::{have_tool, run, run_ok};

/// `hsmca`, with no SoftHSM configuration inherited from the environment that runs the tests.
pub fn hsmca() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hsmca"));
    cmd.env_remove("SOFTHSM2_CONF")
        .env_remove("HSMCA_INIT_STAGING")
        .env("RUST_LOG", "warn");
    cmd
}

/// The SoftHSM2 module `hsmca` uses by default.
pub fn module_path() -> PathBuf {
    hsmca_hsm::default_module_path()
        .expect("SoftHSM2 is not installed (no libsofthsm2.so): run softhsm-setup/install.sh")
}

/// Like [`run`], and asserts that the command failed with a non-zero exit code.
pub fn run_fails(cmd: &mut Command) -> Output {
    let output = run(cmd);
    assert!(
        !output.status.success() && output.status.code().is_some(),
        "{cmd:?} should have failed: {}",
        output.status
    );
    output
}

/// Standard output and error, together.
pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Every file and directory under `dir`: its permission bits, and the bytes of each file.
pub type Snapshot = BTreeMap<PathBuf, (u32, Option<Vec<u8>>)>;

/// Takes a [`Snapshot`] of `dir` (the directory itself included).
pub fn snapshot(dir: &Path) -> Snapshot {
    fn walk(root: &Path, path: &Path, out: &mut Snapshot) {
        let meta =
            std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() {
            out.insert(rel, (mode, None));
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for entry in entries {
                walk(root, &entry, out);
            }
        } else {
            out.insert(rel, (mode, Some(std::fs::read(path).unwrap())));
        }
    }
    let mut out = Snapshot::new();
    walk(dir, dir, &mut out);
    out
}

/// Asserts that two snapshots are equal, naming the first difference.
pub fn assert_unchanged(before: &Snapshot, after: &Snapshot, what: &str) {
    for (path, entry) in before {
        match after.get(path) {
            None => panic!("{what}: {} disappeared", path.display()),
            Some(e) if e.0 != entry.0 => panic!(
                "{what}: mode of {} changed from {:o} to {:o}",
                path.display(),
                entry.0,
                e.0
            ),
            Some(e) if e.1 != entry.1 => panic!("{what}: {} changed", path.display()),
            Some(_) => {}
        }
    }
    for path in after.keys() {
        assert!(
            before.contains_key(path),
            "{what}: {} appeared",
            path.display()
        );
    }
}

/// `openssl verify -CAfile root -untrusted untrusted cert` must pass.
pub fn openssl_verify(root: &Path, untrusted: &Path, cert: &Path) {
    if !have_tool("openssl") {
        return;
    }
    let out = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(root)
        .arg("-untrusted")
        .arg(untrusted)
        .arg(cert));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK"),
        "openssl does not verify {}",
        cert.display()
    );
}

/// `openssl x509 -noout -text` of a certificate.
pub fn openssl_text(cert: &Path) -> String {
    let out = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(cert),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// pkilint (RFC 5280) must report no ERROR or FATAL finding for the certificate.
pub fn lint_has_no_errors(cert: &Path) {
    if !have_tool("lint_pkix_cert") {
        return;
    }
    let out = run(Command::new("lint_pkix_cert")
        .args(["lint", "-s", "ERROR"])
        .arg(cert));
    let findings = text(&out);
    assert!(
        out.status.success() && !findings.contains("(ERROR)") && !findings.contains("(FATAL)"),
        "lint_pkix_cert reports errors for {}:\n{findings}",
        cert.display()
    );
}

/// The `Access:` line of each private key that `pkcs11-tool -O` lists, by label.
pub fn pkcs11_tool_private_keys(
    softhsm_conf: &Path,
    token_label: &str,
    pin: &str,
) -> BTreeMap<String, String> {
    let out = run_ok(
        Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", softhsm_conf)
            .arg("--module")
            .arg(module_path())
            .args(["--token-label", token_label, "--login", "--pin", pin])
            .args(["--list-objects", "--type", "privkey"]),
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    // Each object starts with an unindented header line ("Private Key Object; EC").
    let mut keys = BTreeMap::new();
    let mut current: Option<(bool, Option<String>, Option<String>)> = None;
    let mut flush = |cur: Option<(bool, Option<String>, Option<String>)>| {
        if let Some((true, Some(label), access)) = cur {
            keys.insert(label, access.unwrap_or_default());
        }
    };
    for line in listing.lines() {
        if !line.is_empty() && !line.starts_with(char::is_whitespace) {
            flush(current.take());
            current = Some((line.starts_with("Private Key Object"), None, None));
        } else if let Some(cur) = current.as_mut() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("label:") {
                cur.1 = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("Access:") {
                cur.2 = Some(v.trim().to_owned());
            }
        }
    }
    flush(current.take());
    keys
}

/// Makes a SoftHSM2 token with `softhsm-setup/make-token.sh` and returns the `SOFTHSM2_CONF`
/// path it printed.
pub fn make_token(dir: &Path, label: &str, pin: &str, so_pin: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-setup/make-token.sh");
    let out = run_ok(
        Command::new("bash")
            .arg(&script)
            .arg(dir)
            .args([label, pin, so_pin]),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let conf = stdout
        .trim()
        .strip_prefix("export SOFTHSM2_CONF=")
        .unwrap_or_else(|| panic!("make-token.sh printed {stdout:?}"));
    let conf = PathBuf::from(conf);
    assert!(conf.is_file(), "{} is not a file", conf.display());
    conf
}

/// `hsmca audit verify PATH [--key KEY]`, run from `dir` when given.
pub fn audit_verify(path: &Path, key: Option<&Path>) -> Output {
    let mut cmd = hsmca();
    cmd.args(["audit", "verify"]).arg(path);
    if let Some(key) = key {
        cmd.arg("--key").arg(key);
    }
    run(&mut cmd)
}

/// The records of an audit log, through `hsmca audit show PATH --json`.
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(hsmca().args(["audit", "show"]).arg(path).arg("--json"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// A serial number in hex, as lower case without leading zeros, `0x` or colons.
pub fn norm_serial(s: &str) -> String {
    s.trim()
        .to_ascii_lowercase()
        .trim_start_matches("0x")
        .replace(':', "")
        .trim_start_matches('0')
        .to_owned()
}

/// The serial of a certificate as `openssl x509 -serial` prints it, normalised
/// ([`norm_serial`]).
pub fn openssl_serial(cert: &Path) -> String {
    let out = run_ok(
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(cert),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let serial = stdout
        .trim()
        .strip_prefix("serial=")
        .unwrap_or_else(|| panic!("openssl printed {stdout:?}"));
    norm_serial(serial)
}

/// SHA-256 (hex) of the DER of the first PEM block (certificate or CSR) in a file.
pub fn pem_sha256(path: &Path) -> String {
    use sha2::Digest;
    let text = std::fs::read_to_string(path).unwrap();
    let start = text
        .find("-----BEGIN ")
        .unwrap_or_else(|| panic!("{} holds no PEM", path.display()));
    let end_marker = text[start..].find("-----END ").unwrap() + start;
    let end = text[end_marker + 9..].find("-----").unwrap() + end_marker + 9 + 5;
    let (_, der) = der::pem::decode_vec(&text.as_bytes()[start..end])
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::encode(sha2::Sha256::digest(&der))
}

/// Asserts that an audit log was closed: a stop record, then a checkpoint sealing everything.
pub fn assert_closed_and_sealed(records: &[serde_json::Value]) {
    let kinds: Vec<_> = records
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds[kinds.len() - 2..],
        ["stop", "checkpoint"],
        "{kinds:?}"
    );
}
