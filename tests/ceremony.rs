//! Key ceremonies driven by the example configurations in examples/ceremony/: a P-384 root, a
//! P-256 intermediate in a second token, and a CSR signed by an external (openssl) root and
//! imported. Checked from the outside with openssl and pkilint.

mod cli_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use cli_common::{
    assert_unchanged, have_tool, hsmca, lint_has_no_errors, make_token, openssl_text,
    openssl_verify, pkcs11_tool_private_keys, run_fails, run_ok, snapshot, text,
};

const ROOT_TOKEN: &str = "hsmca-root";
const ROOT_PIN: &str = "31415926";
const INTERMEDIATE_TOKEN: &str = "hsmca-intermediate";
const INTERMEDIATE_PIN: &str = "27182818";
const CA_FILES: [&str; 3] = ["root-cert.pem", "ca-cert.pem", "cert-chain.pem"];

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
    let root = c.path("root-cert.pem");
    assert!(root.is_file());
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

    // Each token holds exactly its own protected key.
    if have_tool("pkcs11-tool") {
        let keys = c.keys(ROOT_TOKEN, ROOT_PIN);
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_protected(&keys, "root-2025");
        let keys = c.keys(INTERMEDIATE_TOKEN, INTERMEDIATE_PIN);
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_protected(&keys, "intermediate-2025");
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
    assert_unchanged(
        &before,
        &snapshot(&c.dir),
        "import of another key's certificate",
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
    assert_unchanged(&before, &snapshot(&c.dir), "import of a non-CA certificate");

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
    assert_unchanged(&before, &snapshot(&c.dir), "import with a wrong chain");

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
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_protected(&keys, "external-2025");
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
