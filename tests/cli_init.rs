//! `hsmca init`: the embedded SoftHSM2 default, checked from the outside with openssl,
//! pkilint and pkcs11-tool.

mod cli_common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cli_common::{
    assert_closed_and_sealed, assert_unchanged, audit_records, audit_verify, have_tool, hsmca,
    lint_has_no_errors, norm_serial, openssl_serial, openssl_text, openssl_verify, pem_sha256,
    pkcs11_tool_private_keys, run, run_fails, run_ok, snapshot, text,
};

const FILES: [&str; 3] = ["root-cert.pem", "ca-cert.pem", "cert-chain.pem"];
const KEYS: [&str; 2] = ["hsmca-intermediate", "hsmca-root"];
const AUDIT_KEY: &str = "hsmca-audit";

fn init(dir: &Path) -> std::process::Command {
    let mut cmd = hsmca();
    cmd.arg("init").arg("--state-dir").arg(dir);
    cmd
}

#[test]
fn init_creates_a_protected_ca_and_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory that does not exist yet.
    let dir = tmp.path().join("state");
    run_ok(init(&dir).args(["--trust-domain", "example.org"]));

    for name in FILES.iter().chain(["hsm-pin", "softhsm2.conf"].iter()) {
        assert!(dir.join(name).is_file(), "{name} is missing");
    }
    assert!(dir.join("tokens").is_dir());
    let pin_mode = std::fs::metadata(dir.join("hsm-pin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        pin_mode & 0o777,
        0o600,
        "hsm-pin mode {:o}",
        pin_mode & 0o777
    );
    assert!(!dir.join("ca-key.pem").exists(), "a ca-key.pem was written");
    assert!(!dir.join(".init-staging").exists(), "staging left behind");
    // No private key in any file outside the token.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
                "{} holds a private key",
                path.display()
            );
        }
    }
    // cert-chain.pem is the CA certificate then the root.
    let chain = std::fs::read_to_string(dir.join("cert-chain.pem")).unwrap();
    let ca = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap();
    let root = std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    assert_eq!(chain, format!("{ca}{root}"));

    openssl_verify(
        &dir.join("root-cert.pem"),
        &dir.join("cert-chain.pem"),
        &dir.join("ca-cert.pem"),
    );
    if have_tool("openssl") {
        let root_text = openssl_text(&dir.join("root-cert.pem"));
        assert!(
            root_text.contains("Subject: O = example.org"),
            "{root_text}"
        );
        assert!(root_text.contains("CA:TRUE"), "{root_text}");
        let ca_text = openssl_text(&dir.join("ca-cert.pem"));
        assert!(ca_text.contains("CA:TRUE, pathlen:0"), "{ca_text}");
        assert!(ca_text.contains("prime256v1"), "{ca_text}");
    }
    lint_has_no_errors(&dir.join("root-cert.pem"));
    lint_has_no_errors(&dir.join("ca-cert.pem"));

    assert_init_audit_log(&dir);

    // A second init changes nothing at all, token included.
    let before = snapshot(&dir);
    let again = run_ok(&mut init(&dir));
    assert!(
        text(&again).contains("nothing changed"),
        "second init says: {}",
        text(&again)
    );
    assert_unchanged(&before, &snapshot(&dir), "second init");

    // The keys, seen by another PKCS#11 client.
    if have_tool("pkcs11-tool") {
        let pin = std::fs::read_to_string(dir.join("hsm-pin")).unwrap();
        let keys = pkcs11_tool_private_keys(&dir.join("softhsm2.conf"), "hsmca", pin.trim());
        for label in KEYS {
            assert!(keys.contains_key(label), "no private key {label}: {keys:?}");
        }
        // Every private key in the token, the CA keys and any other, is protected.
        for (label, access) in &keys {
            assert!(
                access.starts_with("sensitive, always sensitive, never extractable"),
                "pkcs11-tool shows {label} as {access:?}"
            );
        }
    }

    // And by hsmca itself.
    let listed = run_ok(hsmca().args(["keys", "list", "--state-dir"]).arg(&dir));
    let stdout = String::from_utf8_lossy(&listed.stdout);
    for label in KEYS {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(label))
            .unwrap_or_else(|| panic!("keys list does not show {label}:\n{stdout}"));
        assert!(line.contains("ecdsa-p256"), "{line}");
        assert!(line.trim_end().ends_with("protected"), "{line}");
        assert!(!line.contains("INSECURE"), "{line}");
    }
    // Logging in updates SoftHSM's token.object; the CA files are as they were.
    let after = snapshot(&dir);
    for name in FILES.iter().chain(["hsm-pin", "softhsm2.conf"].iter()) {
        assert_eq!(
            before.get(Path::new(name)),
            after.get(Path::new(name)),
            "{name}"
        );
    }
}

/// The key ceremony of `init` is in `DIR/audit`: one `ceremony` record per key generated and
/// per certificate signed, sealed by the audit key, whose public key is `DIR/audit-key.pem`.
fn assert_init_audit_log(dir: &Path) {
    let audit = dir.join("audit");
    assert!(audit.is_dir(), "no audit log");
    assert!(dir.join("audit-key.pem").is_file(), "no audit public key");
    // The default key is DIR/audit-key.pem.
    let out = audit_verify(&audit, None);
    assert!(out.status.success(), "audit verify: {}", text(&out));
    assert!(text(&out).starts_with("OK: "), "{}", text(&out));

    let records = audit_records(&audit);
    let ceremony: Vec<_> = records.iter().filter(|r| r["kind"] == "ceremony").collect();
    assert_eq!(
        ceremony.len(),
        5,
        "3 keys and 2 certificates: {ceremony:#?}"
    );
    for r in &ceremony {
        assert_eq!(r["decision"], "allow", "{r}");
    }
    for label in KEYS.iter().chain([AUDIT_KEY].iter()) {
        let generated: Vec<_> = ceremony
            .iter()
            .filter(|r| {
                r["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(&format!("generated ecdsa-p256 key \"{label}\" (CKA_ID "))
            })
            .collect();
        assert_eq!(generated.len(), 1, "key {label}: {ceremony:#?}");
        assert!(
            generated[0]["reason"]
                .as_str()
                .unwrap()
                .contains("in token \"hsmca\""),
            "{}",
            generated[0]
        );
    }
    for (what, file) in [
        ("root certificate", "root-cert.pem"),
        ("intermediate certificate", "ca-cert.pem"),
    ] {
        let signed: Vec<_> = ceremony
            .iter()
            .filter(|r| {
                r["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(&format!("signed {what}"))
            })
            .collect();
        assert_eq!(signed.len(), 1, "{what}: {ceremony:#?}");
        let r = signed[0];
        let cert = dir.join(file);
        assert_eq!(r["cert_sha256"], pem_sha256(&cert), "{what}: {r}");
        assert!(
            r["not_before"].is_string() && r["not_after"].is_string(),
            "{r}"
        );
        if have_tool("openssl") {
            assert_eq!(
                norm_serial(r["serial"].as_str().unwrap()),
                openssl_serial(&cert),
                "{what}: the serial recorded is not {file}'s"
            );
        }
    }
    assert_closed_and_sealed(&records);
}

#[test]
fn init_refuses_a_partial_state_dir() {
    let tmp = tempfile::tempdir().unwrap();

    // An unrelated root certificate.
    let dir = tmp.path().join("unrelated-root");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("root-cert.pem"), "not ours\n").unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = snapshot(&dir);
    let out = run_fails(&mut init(&dir));
    assert!(
        text(&out).contains("root-cert.pem"),
        "the error names the file: {}",
        text(&out)
    );
    assert_unchanged(
        &before,
        &snapshot(&dir),
        "init over an unrelated root-cert.pem",
    );

    // Half of an init: a token and its configuration, but no certificates.
    let dir = tmp.path().join("half");
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    std::fs::write(
        dir.join("softhsm2.conf"),
        "directories.tokendir = /nowhere\n",
    )
    .unwrap();
    std::fs::write(dir.join("hsm-pin"), "1234\n").unwrap();
    let before = snapshot(&dir);
    run_fails(&mut init(&dir));
    assert_unchanged(&before, &snapshot(&dir), "init over a half state dir");

    // A leftover audit log, or audit public key, alone: init must not replace them.
    for name in ["audit", "audit-key.pem"] {
        let dir = tmp.path().join(format!("leftover-{name}"));
        std::fs::create_dir(&dir).unwrap();
        if name == "audit" {
            std::fs::create_dir(dir.join(name)).unwrap();
            std::fs::write(dir.join("audit/audit-000001.jsonl"), "someone's log\n").unwrap();
        } else {
            std::fs::write(dir.join(name), "someone's key\n").unwrap();
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let before = snapshot(&dir);
        let out = run_fails(&mut init(&dir));
        assert!(
            text(&out).contains(name),
            "the error names {name}: {}",
            text(&out)
        );
        assert_unchanged(
            &before,
            &snapshot(&dir),
            &format!("init over a lone {name}"),
        );
    }

    // Every CA file but the chain.
    let done = tmp.path().join("done");
    run_ok(&mut init(&done));
    std::fs::remove_file(done.join("cert-chain.pem")).unwrap();
    let before = snapshot(&done);
    run_fails(&mut init(&done));
    assert_unchanged(&before, &snapshot(&done), "init without cert-chain.pem");
    let out = run(hsmca().args(["keys", "list", "--state-dir"]).arg(&done));
    assert!(out.status.success(), "the token is still usable");
}

/// Runs `cmd` in a process group of its own and kills the whole group when it has not finished
/// in time: a command that re-runs itself without end must fail the test, not the machine.
fn run_bounded(cmd: &mut std::process::Command) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};
    let mut child = cmd
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let group = format!("-{}", child.id());
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &group])
                .status();
            let _ = child.wait();
            panic!("{cmd:?} did not finish in 30s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    println!("$ {cmd:?}\n[{}]\n{}", output.status, text(&output));
    output
}

#[test]
fn keys_list_refuses_an_uninitialised_state_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    let pin_only = tmp.path().join("pin-only");
    std::fs::create_dir(&pin_only).unwrap();
    std::fs::write(pin_only.join("hsm-pin"), "1234\n").unwrap();
    for dir in [&missing, &pin_only] {
        let out = run_bounded(hsmca().args(["keys", "list", "--state-dir"]).arg(dir));
        assert!(!out.status.success());
        assert!(
            text(&out).contains("not an initialised hsmca state directory"),
            "{}",
            text(&out)
        );
    }
    assert!(!missing.exists());

    // A re-run child never re-runs itself again, even when SOFTHSM2_CONF does not resolve.
    let done = tmp.path().join("done");
    run_ok(&mut init(&done));
    let out = run_bounded(
        hsmca()
            .args(["keys", "list", "--state-dir"])
            .arg(&done)
            .env("SOFTHSM2_CONF", tmp.path().join("elsewhere.conf"))
            .env(
                "HSMCA_RERUN_SOFTHSM2_CONF",
                tmp.path().join("elsewhere.conf"),
            ),
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("refusing to re-run again"),
        "{}",
        text(&out)
    );
}

#[test]
fn dev_continues_the_audit_log_of_init() {
    use std::time::{Duration, Instant};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    run_ok(&mut init(&dir));
    let before = audit_records(&dir.join("audit"));

    // `hsmca dev` on the initialised directory, until it serves, then SIGTERM.
    let log_path = tmp.path().join("dev.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = hsmca()
        .args(["dev", "--state-dir"])
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env_remove("KUBECONFIG")
        .env("HOME", tmp.path())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let out = std::fs::read_to_string(&log_path).unwrap_or_default();
        if out.contains("serving CreateCertificate") {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("hsmca dev exited ({status}):\n{out}");
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("hsmca dev did not start in 30s:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    run_ok(
        std::process::Command::new("kill")
            .args(["-TERM", "--"])
            .arg(child.id().to_string()),
    );
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("hsmca dev did not stop in 30s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // One chain: init's records unchanged, then the server's, all verified with the key.
    let out = audit_verify(&dir.join("audit"), None);
    assert!(out.status.success(), "audit verify: {}", text(&out));
    let after = audit_records(&dir.join("audit"));
    assert_eq!(after[..before.len()], before[..], "init's records changed");
    let kinds: Vec<_> = after[before.len()..]
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"start"), "{kinds:?}");
    assert_closed_and_sealed(&after);
}
