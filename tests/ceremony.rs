//! Key ceremonies driven by the example configurations in examples/ceremony/: a P-384 root, a
//! P-256 intermediate in a second token, and a CSR signed by an external (openssl) root and
//! imported. Checked from the outside with openssl and pkilint; each ceremony's audit log is
//! checked with `hsmca audit verify` and the audit public key alone.

mod cli_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cli_common::{
    Snapshot, assert_closed_and_sealed, assert_unchanged, audit_records, have_tool, hsmca,
    lint_has_no_errors, make_token, norm_serial, openssl_serial, openssl_text, openssl_verify,
    pem_sha256, pkcs11_tool_private_keys, run, run_fails, run_ok, snapshot, text,
};

const ROOT_TOKEN: &str = "hsmca-root";
const ROOT_PIN: &str = "31415926";
const INTERMEDIATE_TOKEN: &str = "hsmca-intermediate";
const INTERMEDIATE_PIN: &str = "27182818";
const CA_FILES: [&str; 3] = ["root-cert.pem", "ca-cert.pem", "cert-chain.pem"];
/// The audit key of each token, as the example files name it.
const AUDIT_KEY: &str = "audit-2025";
/// The audit logs of the examples, and their public keys.
const ROOT_AUDIT: (&str, &str) = ("audit-root", "audit-root-key.pem");
const INTERMEDIATE_AUDIT: (&str, &str) = ("audit-intermediate", "audit-intermediate-key.pem");

/// A copy of examples/ceremony with two fresh tokens and the intermediate token's PIN file.
struct Ceremony {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    conf: PathBuf,
}

impl Ceremony {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ceremony");
        std::fs::create_dir(&dir).unwrap();
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ceremony");
        for name in ["root.toml", "intermediate.toml", "csr.toml", "import.toml"] {
            std::fs::copy(examples.join(name), dir.join(name)).unwrap();
        }
        let hsm = tmp.path().join("hsm");
        let conf = make_token(&hsm, ROOT_TOKEN, ROOT_PIN, "11111111");
        assert_eq!(
            make_token(&hsm, INTERMEDIATE_TOKEN, INTERMEDIATE_PIN, "22222222"),
            conf
        );
        let pin_file = dir.join("intermediate.pin");
        std::fs::write(&pin_file, format!("{INTERMEDIATE_PIN}\n")).unwrap();
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Ceremony {
            _tmp: tmp,
            dir,
            conf,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `hsmca ARGS...` with the tokens' SoftHSM configuration and the root PIN variable.
    fn hsmca(&self, args: &[&str]) -> Command {
        let mut cmd = hsmca();
        cmd.current_dir(&self.dir)
            .env("SOFTHSM2_CONF", &self.conf)
            .env("HSMCA_ROOT_PIN", ROOT_PIN)
            .args(args);
        cmd
    }

    /// `hsmca ceremony KIND CONFIG`, with CONFIG given as an absolute path.
    fn ceremony(&self, kind: &str, config: &str) -> Command {
        let config = self.path(config);
        self.hsmca(&["ceremony", kind, config.to_str().unwrap()])
    }

    /// The private keys of a token and their `Access:` lines, through pkcs11-tool.
    fn keys(&self, token: &str, pin: &str) -> Vec<(String, String)> {
        pkcs11_tool_private_keys(&self.conf, token, pin)
            .into_iter()
            .collect()
    }

    /// Writes a variant of the config `from` as `to`, with `replacements` applied.
    fn variant(&self, from: &str, to: &str, replacements: &[(&str, &str)]) {
        let mut text = std::fs::read_to_string(self.path(from)).unwrap();
        for (old, new) in replacements {
            assert!(text.contains(old), "{from} has no {old:?}");
            text = text.replace(old, new);
        }
        std::fs::write(self.path(to), text).unwrap();
    }

    /// `openssl ...` in the ceremony directory.
    fn openssl(&self, args: &[&str]) {
        run_ok(Command::new("openssl").current_dir(&self.dir).args(args));
    }

    /// Checks an audit log (directory, public key) with `hsmca audit verify` and returns its
    /// records. Every log a ceremony leaves is sealed: it ends in a stop and a checkpoint.
    fn audit(&self, (dir, key): (&str, &str)) -> Vec<serde_json::Value> {
        let out = run(&mut self.hsmca(&["audit", "verify", dir, "--key", key]));
        assert!(
            out.status.success() && text(&out).starts_with("OK: "),
            "{dir} does not verify with {key}: {}",
            text(&out)
        );
        let records = audit_records(&self.path(dir));
        assert_closed_and_sealed(&records);
        records
    }
}

/// The `ceremony` records whose reason starts with `prefix`.
fn ceremony_records<'a>(
    records: &'a [serde_json::Value],
    prefix: &str,
) -> Vec<&'a serde_json::Value> {
    records
        .iter()
        .filter(|r| {
            r["kind"] == "ceremony"
                && r["decision"] == "allow"
                && r["reason"].as_str().unwrap_or_default().starts_with(prefix)
        })
        .collect()
}

/// Asserts that the one record of `records` starting with `prefix` is about `cert`: same
/// serial (as openssl prints it) and the SHA-256 of its DER.
fn assert_records_certificate(records: &[serde_json::Value], prefix: &str, cert: &Path) {
    let found = ceremony_records(records, prefix);
    assert_eq!(found.len(), 1, "{prefix}: {records:#?}");
    let r = found[0];
    assert_eq!(r["cert_sha256"], pem_sha256(cert), "{r}");
    assert!(
        r["not_before"].is_string() && r["not_after"].is_string(),
        "{r}"
    );
    if have_tool("openssl") {
        assert_eq!(
            norm_serial(r["serial"].as_str().unwrap()),
            openssl_serial(cert),
            "the serial recorded is not {}'s",
            cert.display()
        );
    }
}

/// The key generations recorded: the labels, in order.
fn generated_keys(records: &[serde_json::Value]) -> Vec<String> {
    ceremony_records(records, "generated ")
        .iter()
        .map(|r| {
            let reason = r["reason"].as_str().unwrap();
            reason.split('"').nth(1).unwrap().to_owned()
        })
        .collect()
}

/// Like [`assert_unchanged`] outside the audit log `dir`, where a failed ceremony adds its
/// `failed` record; returns that record's reason.
fn assert_only_failure_recorded(
    c: &Ceremony,
    before: &Snapshot,
    log: (&str, &str),
    what: &str,
) -> String {
    let outside = |s: &Snapshot| -> Snapshot {
        s.iter()
            .filter(|(p, _)| !p.starts_with(log.0))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    };
    assert_unchanged(&outside(before), &outside(&snapshot(&c.dir)), what);
    let records = c.audit(log);
    let failed = &records[records.len() - 3];
    assert_eq!(failed["kind"], "failed", "{what}: {failed}");
    failed["reason"].as_str().unwrap().to_owned()
}

fn assert_protected(keys: &[(String, String)], label: &str) {
    let access = keys
        .iter()
        .find(|(l, _)| l == label)
        .map(|(_, a)| a)
        .unwrap_or_else(|| panic!("pkcs11-tool does not list {label}: {keys:?}"));
    assert!(
        access.starts_with("sensitive, always sensitive, never extractable"),
        "{label}: {access:?}"
    );
}

/// The DER certificates in a PEM file, as base64 without line breaks.
fn pem_bodies(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .map(|block| {
            block
                .split("-----END CERTIFICATE-----")
                .next()
                .unwrap()
                .split_whitespace()
                .collect()
        })
        .collect()
}

fn assert_ca_files(dir: &Path) {
    for name in CA_FILES {
        assert!(
            dir.join(name).is_file(),
            "{}/{name} is missing",
            dir.display()
        );
    }
    assert!(!dir.join("ca-key.pem").exists());
    let chain = pem_bodies(&dir.join("cert-chain.pem"));
    assert_eq!(chain.len(), 2, "cert-chain.pem holds the CA and the root");
    assert_eq!(chain[0], pem_bodies(&dir.join("ca-cert.pem"))[0]);
    assert_eq!(chain[1], pem_bodies(&dir.join("root-cert.pem"))[0]);
    openssl_verify(
        &dir.join("root-cert.pem"),
        &dir.join("cert-chain.pem"),
        &dir.join("ca-cert.pem"),
    );
}

#[test]
fn root_and_intermediate_ceremonies() {
    let c = Ceremony::new();

    // Root: a P-384 key generated in the root token, and its self-signed certificate.
    let out = run_ok(&mut c.ceremony("root", "root.toml"));
    assert!(text(&out).contains("generated ecdsa-p384 key \"root-2025\""));
    assert!(
        text(&out).contains("recording this ceremony in the audit log"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("NOT recorded"), "{}", text(&out));
    let root = c.path("root-cert.pem");
    assert!(root.is_file());

    // Its audit log, sealed by the audit key generated in the root token: the start, both
    // keys, and the certificate with its serial.
    let records = c.audit(ROOT_AUDIT);
    assert_eq!(generated_keys(&records), [AUDIT_KEY, "root-2025"]);
    let began = ceremony_records(&records, "began root ceremony from ");
    assert_eq!(began.len(), 1, "{records:#?}");
    assert!(
        began[0]["reason"].as_str().unwrap().contains("root.toml"),
        "{}",
        began[0]
    );
    assert_records_certificate(&records, "signed root certificate", &root);
    assert!(
        ceremony_records(&records, "generated ecdsa-p384 key \"root-2025\"")[0]["reason"]
            .as_str()
            .unwrap()
            .contains("in token \"hsmca-root\""),
        "{records:#?}"
    );
    if have_tool("openssl") {
        let t = openssl_text(&root);
        assert!(t.contains("NIST CURVE: P-384"), "{t}");
        assert!(t.contains("ecdsa-with-SHA384"), "{t}");
        assert!(
            t.contains("Subject: O = Example Org, CN = Example Root CA"),
            "{t}"
        );
        assert!(
            t.contains("Issuer: O = Example Org, CN = Example Root CA"),
            "{t}"
        );
        assert!(t.contains("CA:TRUE"), "{t}");
        assert!(t.contains("Certificate Sign, CRL Sign"), "{t}");
        // Self-signed: verifies with itself as the only trust anchor.
        openssl_verify(&root, &root, &root);
    }
    lint_has_no_errors(&root);

    // Running it again fails: the output exists. Nothing changes, no second key appears.
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("root", "root.toml"));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert_unchanged(&before, &snapshot(&c.dir), "second root ceremony");

    // Intermediate: a P-256 key in the second token, certified by the root key.
    let out = run_ok(&mut c.ceremony("intermediate", "intermediate.toml"));
    assert!(text(&out).contains("generated ecdsa-p256 key \"intermediate-2025\""));
    let out_dir = c.path("intermediate");
    assert_ca_files(&out_dir);

    // Recorded in the intermediate token's log, sealed by that token's audit key; the root's
    // log is as it was, and one token's audit key does not verify the other's log.
    let records = c.audit(INTERMEDIATE_AUDIT);
    assert_eq!(generated_keys(&records), [AUDIT_KEY, "intermediate-2025"]);
    assert_records_certificate(
        &records,
        "signed intermediate certificate",
        &out_dir.join("ca-cert.pem"),
    );
    assert_eq!(
        c.audit(ROOT_AUDIT).len(),
        6,
        "start, 2 keys, 1 certificate, stop, seal"
    );
    let out = run(&mut c.hsmca(&[
        "audit",
        "verify",
        ROOT_AUDIT.0,
        "--key",
        INTERMEDIATE_AUDIT.1,
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("another key"), "{}", text(&out));
    assert_eq!(
        pem_bodies(&out_dir.join("root-cert.pem")),
        pem_bodies(&root),
        "the root is the root ceremony's"
    );
    if have_tool("openssl") {
        let t = openssl_text(&out_dir.join("ca-cert.pem"));
        assert!(t.contains("NIST CURVE: P-256"), "{t}");
        assert!(
            t.contains("ecdsa-with-SHA384"),
            "signed by the P-384 root: {t}"
        );
        assert!(
            t.contains("Subject: O = Example Org, CN = Example Intermediate CA"),
            "{t}"
        );
        assert!(t.contains("CA:TRUE, pathlen:0"), "{t}");
    }
    lint_has_no_errors(&out_dir.join("ca-cert.pem"));

    // Again: the outputs exist, so it fails and writes nothing.
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("intermediate", "intermediate.toml"));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert_unchanged(&before, &snapshot(&c.dir), "second intermediate ceremony");

    // Each token holds exactly its own protected CA key and audit key.
    if have_tool("pkcs11-tool") {
        let keys = c.keys(ROOT_TOKEN, ROOT_PIN);
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_protected(&keys, "root-2025");
        assert_protected(&keys, AUDIT_KEY);
        let keys = c.keys(INTERMEDIATE_TOKEN, INTERMEDIATE_PIN);
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_protected(&keys, "intermediate-2025");
        assert_protected(&keys, AUDIT_KEY);
    }
    let listed = run_ok(&mut c.hsmca(&[
        "keys",
        "list",
        "--token",
        INTERMEDIATE_TOKEN,
        "--pin-file",
        "intermediate.pin",
    ]));
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("intermediate-2025") && l.trim_end().ends_with("protected")),
        "{listed}"
    );
}

#[test]
fn ceremony_refuses_a_pin_file_others_can_read() {
    let c = Ceremony::new();
    std::fs::set_permissions(
        c.path("intermediate.pin"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("csr", "csr.toml"));
    assert!(
        text(&out).contains("readable by group or others"),
        "{}",
        text(&out)
    );
    assert_unchanged(
        &before,
        &snapshot(&c.dir),
        "csr with a world-readable PIN file",
    );
}

#[test]
fn csr_signed_by_an_external_root_is_imported() {
    if !have_tool("openssl") {
        return;
    }
    let c = Ceremony::new();

    // CSR for a new key in the token.
    let out = run_ok(&mut c.ceremony("csr", "csr.toml"));
    assert!(text(&out).contains("generated ecdsa-p256 key \"external-2025\""));
    let csr = c.path("external.csr");
    assert!(csr.is_file());
    let records = c.audit(INTERMEDIATE_AUDIT);
    assert_eq!(generated_keys(&records), [AUDIT_KEY, "external-2025"]);
    let made = ceremony_records(&records, "made a CSR for key \"external-2025\"");
    assert_eq!(made.len(), 1, "{records:#?}");
    assert_eq!(made[0]["csr_sha256"], pem_sha256(&csr), "{}", made[0]);
    c.openssl(&["req", "-in", "external.csr", "-noout", "-verify"]);
    let subject = Command::new("openssl")
        .current_dir(&c.dir)
        .args(["req", "-in", "external.csr", "-noout", "-subject"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&subject.stdout)
            .contains("subject=O = Example Org, CN = Example Issuing CA"),
        "{}",
        String::from_utf8_lossy(&subject.stdout)
    );

    // Again: the CSR exists, so it fails and leaves it alone.
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("csr", "csr.toml"));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert_unchanged(&before, &snapshot(&c.dir), "second csr ceremony");

    // An external root, in software, signs the CSR as an intermediate CA.
    std::fs::write(
        c.path("ca.cnf"),
        "[req]\n\
         distinguished_name = dn\n\
         [dn]\n\
         [root]\n\
         basicConstraints = critical, CA:TRUE\n\
         keyUsage = critical, keyCertSign, cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [intermediate]\n\
         basicConstraints = critical, CA:TRUE, pathlen:0\n\
         keyUsage = critical, keyCertSign, cRLSign\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid:always\n\
         [leaf]\n\
         basicConstraints = critical, CA:FALSE\n\
         keyUsage = critical, digitalSignature\n\
         subjectKeyIdentifier = hash\n\
         authorityKeyIdentifier = keyid:always\n",
    )
    .unwrap();
    c.openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-384",
        "-nodes",
        "-keyout",
        "ext-root.key",
        "-subj",
        "/CN=External Root CA/O=Elsewhere",
        "-days",
        "3650",
        "-sha384",
        "-config",
        "ca.cnf",
        "-extensions",
        "root",
        "-out",
        "external-chain.pem",
    ]);
    c.openssl(&[
        "x509",
        "-req",
        "-in",
        "external.csr",
        "-CA",
        "external-chain.pem",
        "-CAkey",
        "ext-root.key",
        "-set_serial",
        "0x1a2b3c4d5e6f",
        "-days",
        "365",
        "-sha384",
        "-extfile",
        "ca.cnf",
        "-extensions",
        "intermediate",
        "-out",
        "external-cert.pem",
    ]);

    // A certificate for a different key, from the same root: must not be imported.
    c.openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "other.key",
        "-subj",
        "/CN=Example Issuing CA/O=Example Org",
        "-config",
        "ca.cnf",
        "-out",
        "other.csr",
    ]);
    c.openssl(&[
        "x509",
        "-req",
        "-in",
        "other.csr",
        "-CA",
        "external-chain.pem",
        "-CAkey",
        "ext-root.key",
        "-set_serial",
        "0x6f5e4d3c2b1a",
        "-days",
        "365",
        "-sha384",
        "-extfile",
        "ca.cnf",
        "-extensions",
        "intermediate",
        "-out",
        "other-cert.pem",
    ]);
    c.variant(
        "import.toml",
        "import-other.toml",
        &[
            ("\"external-cert.pem\"", "\"other-cert.pem\""),
            ("dir = \"external\"", "dir = \"external-other\""),
        ],
    );
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("import", "import-other.toml"));
    assert!(text(&out).contains("does not certify"), "{}", text(&out));
    assert!(
        !c.path("external-other").exists(),
        "the failed import wrote its directory"
    );
    // The attempt is in the audit log: a failed record with the reason, and nothing else.
    let reason = assert_only_failure_recorded(
        &c,
        &before,
        INTERMEDIATE_AUDIT,
        "import of another key's certificate",
    );
    assert!(
        reason.starts_with("import ceremony failed: ") && reason.contains("does not certify"),
        "{reason}"
    );

    // The token key's certificate, but not a CA certificate: refused, nothing written.
    c.openssl(&[
        "x509",
        "-req",
        "-in",
        "external.csr",
        "-CA",
        "external-chain.pem",
        "-CAkey",
        "ext-root.key",
        "-set_serial",
        "0x0badcafe",
        "-days",
        "365",
        "-sha384",
        "-extfile",
        "ca.cnf",
        "-extensions",
        "leaf",
        "-out",
        "leaf-cert.pem",
    ]);
    c.variant(
        "import.toml",
        "import-leaf.toml",
        &[
            ("\"external-cert.pem\"", "\"leaf-cert.pem\""),
            ("dir = \"external\"", "dir = \"external-leaf\""),
        ],
    );
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("import", "import-leaf.toml"));
    assert!(
        text(&out).contains("is not a CA certificate"),
        "{}",
        text(&out)
    );
    let reason = assert_only_failure_recorded(
        &c,
        &before,
        INTERMEDIATE_AUDIT,
        "import of a non-CA certificate",
    );
    assert!(reason.contains("is not a CA certificate"), "{reason}");

    // A chain that does not lead to the certificate's issuer: refused, nothing written.
    c.variant(
        "import.toml",
        "import-bad-chain.toml",
        &[
            ("\"external-chain.pem\"", "\"external-cert.pem\""),
            ("dir = \"external\"", "dir = \"external-bad-chain\""),
        ],
    );
    let before = snapshot(&c.dir);
    run_fails(&mut c.ceremony("import", "import-bad-chain.toml"));
    assert_only_failure_recorded(&c, &before, INTERMEDIATE_AUDIT, "import with a wrong chain");

    // The right certificate imports.
    let out = run_ok(&mut c.ceremony("import", "import.toml"));
    assert!(
        text(&out).contains("chain verifies to root"),
        "{}",
        text(&out)
    );
    let out_dir = c.path("external");
    assert_ca_files(&out_dir);
    assert_eq!(
        pem_bodies(&out_dir.join("root-cert.pem")),
        pem_bodies(&c.path("external-chain.pem"))
    );
    assert_eq!(
        pem_bodies(&out_dir.join("ca-cert.pem")),
        pem_bodies(&c.path("external-cert.pem"))
    );
    lint_has_no_errors(&out_dir.join("ca-cert.pem"));

    // The import is recorded with the certificate's serial, after the CSR of the same key and
    // the three failed attempts, in one log.
    let records = c.audit(INTERMEDIATE_AUDIT);
    assert_records_certificate(
        &records,
        "imported certificate",
        &c.path("external-cert.pem"),
    );
    let imported = ceremony_records(&records, "imported certificate")[0];
    assert_eq!(
        norm_serial(imported["serial"].as_str().unwrap()),
        "1a2b3c4d5e6f"
    );
    assert_eq!(
        records.iter().filter(|r| r["kind"] == "failed").count(),
        3,
        "{records:#?}"
    );
    // The import made no key: the audit key came from the CSR ceremony.
    assert_eq!(generated_keys(&records), [AUDIT_KEY, "external-2025"]);

    // Importing again fails: the files exist and are left as they are.
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("import", "import.toml"));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert_unchanged(&before, &snapshot(&c.dir), "second import");

    // An output directory holding only some of the files: fails and adds none.
    c.variant(
        "import.toml",
        "import-partial.toml",
        &[("dir = \"external\"", "dir = \"partial\"")],
    );
    std::fs::create_dir(c.path("partial")).unwrap();
    std::fs::write(c.path("partial/cert-chain.pem"), "someone else's\n").unwrap();
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("import", "import-partial.toml"));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert_unchanged(
        &before,
        &snapshot(&c.dir),
        "import into a partial directory",
    );

    if have_tool("pkcs11-tool") {
        let keys = c.keys(INTERMEDIATE_TOKEN, INTERMEDIATE_PIN);
        assert_eq!(keys.len(), 2, "{keys:?}");
        assert_protected(&keys, "external-2025");
        assert_protected(&keys, AUDIT_KEY);
    }
}

#[test]
fn outputs_may_go_into_new_directories() {
    let c = Ceremony::new();
    c.variant(
        "root.toml",
        "root-sub.toml",
        &[(
            "certificate = \"root-cert.pem\"",
            "certificate = \"certs/root/root-cert.pem\"",
        )],
    );
    run_ok(&mut c.ceremony("root", "root-sub.toml"));
    assert!(c.path("certs/root/root-cert.pem").is_file());
    c.variant(
        "csr.toml",
        "csr-sub.toml",
        &[(
            "output = \"external.csr\"",
            "output = \"requests/external.csr\"",
        )],
    );
    run_ok(&mut c.ceremony("csr", "csr-sub.toml"));
    assert!(c.path("requests/external.csr").is_file());
}

#[test]
fn ceremony_audit_log_refusals_and_failures() {
    let c = Ceremony::new();

    // Without [audit] a ceremony runs, warns that it is not recorded, and writes no log.
    let text_without_audit = {
        let full = std::fs::read_to_string(c.path("root.toml")).unwrap();
        full[..full.find("\n[audit]").unwrap()].to_owned()
    };
    std::fs::write(
        c.path("root-unaudited.toml"),
        text_without_audit
            .replace("root-cert.pem", "unaudited-cert.pem")
            .replace("root-2025", "root-unaudited"),
    )
    .unwrap();
    let out = run_ok(&mut c.ceremony("root", "root-unaudited.toml"));
    assert!(
        text(&out).contains("has no [audit] table: this root ceremony is NOT recorded"),
        "{}",
        text(&out)
    );
    assert!(c.path("unaudited-cert.pem").is_file());
    assert!(!c.path(ROOT_AUDIT.0).exists());
    assert!(!c.path(ROOT_AUDIT.1).exists());

    // An audit key that is missing, without generate_key: refused before anything happens.
    c.variant(
        "root.toml",
        "root-no-audit-key.toml",
        &[
            ("generate_key = true\n", ""),
            ("label = \"root-2025\"", "label = \"root-2026\""),
        ],
    );
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("root", "root-no-audit-key.toml"));
    assert!(
        text(&out).contains("audit key \"audit-2025\" is not in token \"hsmca-root\""),
        "{}",
        text(&out)
    );
    assert_unchanged(&before, &snapshot(&c.dir), "root without its audit key");

    // The audit key may not be a CA key of the ceremony.
    c.variant(
        "root.toml",
        "root-same-key.toml",
        &[("key_label = \"audit-2025\"", "key_label = \"root-2025\"")],
    );
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("root", "root-same-key.toml"));
    assert!(
        text(&out).contains("must be a key of its own"),
        "{}",
        text(&out)
    );
    assert_unchanged(&before, &snapshot(&c.dir), "root with its key as audit key");

    // A ceremony that fails once its log is open records why, and the log stays sealed.
    run_ok(&mut c.ceremony("root", "root.toml"));
    c.variant(
        "root.toml",
        "root-again.toml",
        &[(
            "certificate = \"root-cert.pem\"",
            "certificate = \"again.pem\"",
        )],
    );
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("root", "root-again.toml"));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert!(
        text(&out).contains("the failure is recorded in the audit log"),
        "{}",
        text(&out)
    );
    let reason = assert_only_failure_recorded(&c, &before, ROOT_AUDIT, "root with a used label");
    assert!(
        reason.starts_with("root ceremony failed: ") && reason.contains("root-2025"),
        "{reason}"
    );
    // The audit key was made once, by the first ceremony, and reused.
    let records = c.audit(ROOT_AUDIT);
    assert_eq!(generated_keys(&records), [AUDIT_KEY, "root-2025"]);
    assert_eq!(
        ceremony_records(&records, "began root ceremony").len(),
        2,
        "{records:#?}"
    );

    // A published audit key that is not the token's: refused, nothing written.
    std::fs::copy(c.path(ROOT_AUDIT.1), c.path("wrong-key.pem")).unwrap();
    c.variant(
        "csr.toml",
        "csr-wrong-key.toml",
        &[(
            "public_key = \"audit-intermediate-key.pem\"",
            "public_key = \"wrong-key.pem\"",
        )],
    );
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("csr", "csr-wrong-key.toml"));
    assert!(
        text(&out).contains("wrong token or label"),
        "{}",
        text(&out)
    );
    assert_unchanged(
        &before,
        &snapshot(&c.dir),
        "csr with another token's audit key",
    );
    run_ok(&mut c.ceremony("csr", "csr.toml"));
    c.variant(
        "csr.toml",
        "csr-wrong-key-2.toml",
        &[
            (
                "public_key = \"audit-intermediate-key.pem\"",
                "public_key = \"wrong-key.pem\"",
            ),
            ("output = \"external.csr\"", "output = \"external-2.csr\""),
        ],
    );
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("csr", "csr-wrong-key-2.toml"));
    assert!(
        text(&out).contains("is not the public key of audit key"),
        "{}",
        text(&out)
    );
    assert_unchanged(
        &before,
        &snapshot(&c.dir),
        "csr with a wrong audit public key",
    );

    // An edited log does not verify, and no ceremony continues (or seals) it.
    let log_file = c.path("audit-root/audit-000001.jsonl");
    let edited = std::fs::read_to_string(&log_file)
        .unwrap()
        .replacen("root-2025", "root-2024", 1);
    std::fs::write(&log_file, edited).unwrap();
    let out = run(&mut c.hsmca(&["audit", "verify", ROOT_AUDIT.0, "--key", ROOT_AUDIT.1]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    c.variant(
        "root.toml",
        "root-third.toml",
        &[
            (
                "certificate = \"root-cert.pem\"",
                "certificate = \"third.pem\"",
            ),
            ("label = \"root-2025\"", "label = \"root-2027\""),
        ],
    );
    let before = snapshot(&c.dir);
    let out = run_fails(&mut c.ceremony("root", "root-third.toml"));
    assert!(
        text(&out).contains("does not verify with the audit key"),
        "{}",
        text(&out)
    );
    assert!(!c.path("third.pem").exists());
    assert_unchanged(&before, &snapshot(&c.dir), "root ceremony on an edited log");
}
