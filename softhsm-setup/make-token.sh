#!/usr/bin/env bash
# Makes an isolated SoftHSM2 token in DIR and prints the line that points SoftHSM at it.
#
#   softhsm-setup/make-token.sh DIR [LABEL] [PIN] [SO_PIN]
#   eval "$(softhsm-setup/make-token.sh /tmp/hsm hsmca 1234 5678)"
#
# Writes DIR/softhsm2.conf (tokens in DIR/tokens), initialises a token labelled LABEL
# (default "hsmca") with user PIN PIN (default "1234") and SO PIN SO_PIN (default "5678"),
# and prints `export SOFTHSM2_CONF=DIR/softhsm2.conf` on standard output (everything else goes
# to standard error). Running it again in the same DIR adds another token when LABEL is new,
# and fails when a token with LABEL exists. The default PINs are for tests only.
set -euo pipefail

usage() {
  echo "usage: $0 DIR [LABEL] [PIN] [SO_PIN]" >&2
  exit 2
}

[[ $# -ge 1 && $# -le 4 ]] || usage
[[ -n "$1" ]] || usage

dir="$1"
label="${2:-hsmca}"
pin="${3:-1234}"
so_pin="${4:-5678}"

if ! command -v softhsm2-util >/dev/null 2>&1; then
  echo "make-token.sh: softhsm2-util not found; run $(dirname "$0")/install.sh" >&2
  exit 1
fi

mkdir -p "$dir/tokens"
dir="$(cd "$dir" && pwd -P)"
conf="$dir/softhsm2.conf"

if [[ ! -e "$conf" ]]; then
  umask 077
  cat >"$conf" <<CONF
# SoftHSM2 configuration written by softhsm-setup/make-token.sh
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
fi

existing_labels="$(SOFTHSM2_CONF="$conf" softhsm2-util --show-slots 2>/dev/null |
  sed -n 's/^[[:space:]]*Label:[[:space:]]*//p' | sed 's/[[:space:]]*$//')" || existing_labels=""
if grep -qxF -- "$label" <<<"$existing_labels"; then
  echo "make-token.sh: a token labelled \"$label\" already exists in $dir/tokens" >&2
  exit 1
fi

SOFTHSM2_CONF="$conf" softhsm2-util --init-token --free \
  --label "$label" --pin "$pin" --so-pin "$so_pin" >&2

printf 'export SOFTHSM2_CONF=%q\n' "$conf"
