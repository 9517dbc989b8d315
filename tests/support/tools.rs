//! Test support shared by the Rust test crates (included with `#[path]`): running external
//! tools and reporting what they printed.

use std::process::{Command, Output};

const REQUIRE_TOOLS_ENV: &str = "HSMCA_REQUIRE_TOOLS";

/// True when `tool` is on PATH. When it is not, says so and returns false so that the caller
/// skips its check, unless `HSMCA_REQUIRE_TOOLS=1`, where it panics.
pub fn have_tool(tool: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()));
    if found {
        return true;
    }
    if std::env::var(REQUIRE_TOOLS_ENV).as_deref() == Ok("1") {
        panic!("{tool} is not on PATH and {REQUIRE_TOOLS_ENV}=1: run softhsm-setup/install.sh");
    }
    eprintln!(
        "SKIPPING a check: {tool} is not on PATH (set {REQUIRE_TOOLS_ENV}=1 to fail instead)"
    );
    false
}

/// Runs a command, prints what it did (shown when the test fails) and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    println!(
        "$ {cmd:?}\n[{}]\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Like [`run`], and asserts that the command succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let output = run(cmd);
    assert!(output.status.success(), "{cmd:?} failed: {}", output.status);
    output
}
