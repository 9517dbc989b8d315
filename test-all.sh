#!/usr/bin/env bash
# Runs every test of hsmca on a fresh machine: installs what the tests need (SoftHSM2, OpenSSL,
# pkcs11-tool, Python grpcio/cryptography/pkilint/pytest), then formatting, lints, the Rust tests
# against real SoftHSM2 tokens, and the end-to-end tests of the gRPC server.
set -euo pipefail
cd "$(dirname "$0")"

./softhsm-setup/install.sh
# The fault-injection tests also need a network-HSM stand-in (p11-kit server and its client
# module) and chattr (an audit log that cannot be written).
missing=()
command -v p11-kit >/dev/null || missing+=(p11-kit)
[ -e /usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so ] || [ -e /usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so ] || missing+=(p11-kit-modules)
command -v chattr >/dev/null || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r tests/python/requirements.txt

# Missing tools make tests fail instead of skipping.
export HSMCA_REQUIRE_TOOLS=1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Licenses, banned crates and sources of every dependency (advisories need the RustSec
# database from GitHub, which these machines cannot reach).
command -v cargo-deny >/dev/null || cargo install cargo-deny --locked --quiet
cargo deny --offline check licenses bans sources
cargo build --workspace
cargo test --workspace
# A longer property-based fuzz run of the untrusted-input parsers (about a minute).
HSMCA_FUZZ_CASES=20000 cargo test --test fuzz
python3 -m pytest -q tests/python -p no:cacheprovider
