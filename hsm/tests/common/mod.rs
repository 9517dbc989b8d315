//! Test support: every test runs against its own fresh SoftHSM2 token.
//!
//! SoftHSM reads `SOFTHSM2_CONF` once per process, and tests may not change the environment of
//! a running process. So [`in_fresh_token`] works in two steps: the test, run normally (the
//! parent), makes a temporary token directory with its own `softhsm2.conf` and runs the same
//! test executable again for just this one test, with `SOFTHSM2_CONF` and
//! `HSMCA_TEST_TOKEN_DIR` set. That child creates the token "test" (user PIN 1234, SO PIN
//! 5678) and runs the test body. The parent passes only when the child exited 0 and its
//! output shows that exactly this test ran and passed.
//!
//! Environment:
//! - `HSMCA_TEST_PKCS11_MODULE`: the PKCS#11 module (default: the system SoftHSM2).
//! - `HSMCA_REQUIRE_TOOLS=1`: fail, instead of skipping a check, when `pkcs11-tool`,
//!   `openssl` or `python3` is missing (CI sets it).
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use hsmca_hsm::{Module, Pin, Token};

#[path = "../../../tests/support/tools.rs"]
mod tools;
pub use tools::{have_tool, run, run_ok};

/// The label of the token every test gets.
pub const TOKEN_LABEL: &str = "test";
/// Its user PIN.
pub const USER_PIN: &str = "1234";
/// Its SO PIN.
pub const SO_PIN: &str = "5678";

const DIR_ENV: &str = "HSMCA_TEST_TOKEN_DIR";
const MODULE_ENV: &str = "HSMCA_TEST_PKCS11_MODULE";

/// The PKCS#11 module under test.
pub fn module_path() -> PathBuf {
    std::env::var_os(MODULE_ENV)
        .map(PathBuf::from)
        .or_else(hsmca_hsm::default_module_path)
        .expect(
            "SoftHSM2 is not installed (no libsofthsm2.so found): run softhsm-setup/install.sh, \
             or set HSMCA_TEST_PKCS11_MODULE to a PKCS#11 module",
        )
}

/// Runs `body` with a freshly created token labelled [`TOKEN_LABEL`], in a child process of
/// its own. `test_name` must be the exact name of the calling test function.
pub fn in_fresh_token(test_name: &str, body: impl FnOnce(Arc<Token>, &Module)) {
    match std::env::var_os(DIR_ENV) {
        Some(dir) => run_child(Path::new(&dir), body),
        None => run_parent(test_name),
    }
}

fn run_child(dir: &Path, body: impl FnOnce(Arc<Token>, &Module)) {
    // Never touch a token outside the directory the parent made for us.
    let conf = std::env::var_os("SOFTHSM2_CONF").expect("child runs without SOFTHSM2_CONF");
    assert_eq!(
        Path::new(&conf),
        dir.join("softhsm2.conf"),
        "SOFTHSM2_CONF must be the test's own configuration"
    );
    let module = Module::load(&module_path()).expect("loading the PKCS#11 module");
    assert!(
        module.token_labels().expect("listing tokens").is_empty(),
        "the test token directory {} is not fresh",
        dir.display()
    );
    module
        .init_token(
            TOKEN_LABEL,
            &Pin::new(SO_PIN.into()),
            &Pin::new(USER_PIN.into()),
        )
        .expect("creating the test token");
    let token = module
        .open_token(TOKEN_LABEL, Pin::new(USER_PIN.into()))
        .expect("opening the test token");
    body(token, &module);
}

fn run_parent(test_name: &str) {
    let dir = tempfile::Builder::new()
        .prefix("hsmca-hsm-test-")
        .tempdir()
        .expect("creating a temporary directory");
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).expect("creating tokens/");
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("writing softhsm2.conf");

    let exe = std::env::current_exe().expect("locating the test executable");
    let output = Command::new(&exe)
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env("SOFTHSM2_CONF", &conf)
        .env(DIR_ENV, dir.path())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown by the test harness when this test fails.
    println!("--- child stdout ---\n{stdout}--- child stderr ---\n{stderr}--- end of child ---");
    assert!(
        output.status.success(),
        "test {test_name} failed in its token process ({})",
        output.status
    );
    assert!(
        stdout.contains("running 1 test") && stdout.contains("test result: ok. 1 passed;"),
        "the token process did not run test {test_name} (is the name passed to in_fresh_token \
         the exact test name?)"
    );
}

/// `pkcs11-tool` on the test token, logged in as the user (SOFTHSM2_CONF is inherited).
pub fn pkcs11_tool(module: &Module) -> Command {
    let mut cmd = Command::new("pkcs11-tool");
    cmd.arg("--module").arg(module.path()).args([
        "--token-label",
        TOKEN_LABEL,
        "--login",
        "--pin",
        USER_PIN,
    ]);
    cmd
}

/// The `Access:` line that `pkcs11-tool -O` prints for the private key labelled `label`.
pub fn pkcs11_tool_access(module: &Module, label: &str) -> String {
    let out = run_ok(pkcs11_tool(module).args(["--list-objects", "--type", "privkey"]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    access_of(&text, label).unwrap_or_else(|| {
        panic!("pkcs11-tool -O shows no private key labelled {label:?}:\n{text}")
    })
}

fn access_of(listing: &str, label: &str) -> Option<String> {
    // Each object starts with an unindented header line ("Private Key Object; EC").
    let mut blocks: Vec<Vec<&str>> = Vec::new();
    for line in listing.lines() {
        if !line.starts_with(char::is_whitespace) && !line.is_empty() {
            blocks.push(Vec::new());
        }
        if let Some(block) = blocks.last_mut() {
            block.push(line);
        }
    }
    let field = |block: &[&str], name: &str| {
        block
            .iter()
            .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim().to_owned()))
    };
    blocks
        .iter()
        .filter(|b| b[0].starts_with("Private Key Object"))
        .find(|b| field(b, "label:").as_deref() == Some(label))
        .and_then(|b| field(b, "Access:"))
}

/// The independent ctypes PKCS#11 client next to this file.
pub fn read_value_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/pkcs11_read_value.py")
}

/// Runs `pkcs11_read_value.py` (extra `flags` first) for `key_label` in the test token.
pub fn read_value(module: &Module, flags: &[&str], key_label: &str) -> Output {
    run(Command::new("python3")
        .arg(read_value_script())
        .args(flags)
        .arg(module.path())
        .args([TOKEN_LABEL, USER_PIN, key_label]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn access_line_is_found_by_label() {
        let listing = "Private Key Object; EC\n  label:      a\n  ID:  01\n  Access:     \
                       sensitive, extractable\nPublic Key Object; EC\n  label:      b\n\
                       Private Key Object; EC\n  label:      b\n  Access:     sensitive\n";
        assert_eq!(
            super::access_of(listing, "a").as_deref(),
            Some("sensitive, extractable")
        );
        assert_eq!(super::access_of(listing, "b").as_deref(), Some("sensitive"));
        assert_eq!(super::access_of(listing, "c"), None);
    }
}
