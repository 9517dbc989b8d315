#!/usr/bin/env bash
# Installs what hsmca's tests and embedded default need: SoftHSM2 (libsofthsm2.so and
# softhsm2-util), OpenSC's pkcs11-tool and openssl.
#
# Idempotent: does nothing, and prints nothing, when all three are already installed.
# Debian/Ubuntu only (apt-get); runs `apt-get update` only when a package cannot be found.
set -euo pipefail

packages=(softhsm2 opensc openssl)

have_all() {
  command -v softhsm2-util >/dev/null 2>&1 &&
    command -v pkcs11-tool >/dev/null 2>&1 &&
    command -v openssl >/dev/null 2>&1 &&
    softhsm_module >/dev/null
}

# Prints the path of libsofthsm2.so, or fails.
softhsm_module() {
  local candidate
  for candidate in \
    /usr/lib/softhsm/libsofthsm2.so \
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so \
    /usr/local/lib/softhsm/libsofthsm2.so \
    /usr/lib64/pkcs11/libsofthsm2.so \
    /usr/lib/pkcs11/libsofthsm2.so; do
    if [[ -e "$candidate" ]]; then
      printf '%s\n' "$candidate"
      return 0
    fi
  done
  return 1
}

if have_all; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install.sh: apt-get not found; install ${packages[*]} with your package manager" >&2
  exit 1
fi

sudo_cmd=()
if [[ "$(id -u)" -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo_cmd=(sudo)
  else
    echo "install.sh: not root and no sudo; cannot install ${packages[*]}" >&2
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive

# Update the package lists only when apt does not know one of the packages yet.
need_update=false
for pkg in "${packages[@]}"; do
  candidate="$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ { print $2 }')"
  if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
    need_update=true
    break
  fi
done
if [[ "$need_update" == true ]]; then
  "${sudo_cmd[@]}" apt-get update -q
fi

"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"

if ! have_all; then
  echo "install.sh: ${packages[*]} installed, but softhsm2-util, pkcs11-tool, openssl or libsofthsm2.so is still missing" >&2
  exit 1
fi
echo "install.sh: installed ${packages[*]}; SoftHSM2 module: $(softhsm_module)"
