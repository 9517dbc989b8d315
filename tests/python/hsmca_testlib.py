"""Helpers for the hsmca end-to-end suite: processes, gRPC client, CSRs, certificate checks.

Nothing here talks to anything but the processes the suite starts itself on 127.0.0.1.
"""

import datetime
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HSMCA = os.environ.get("HSMCA_BIN", os.path.join(REPO, "target", "debug", "hsmca"))
PROTO_DIR = os.path.join(REPO, "proto")
PROTO_FILE = os.path.join(PROTO_DIR, "istio", "ca.proto")
FAKE_KUBE = os.path.join(REPO, "tests", "support", "fake_kube_apiserver.py")

TRUST_DOMAIN = "cluster.local"
SA_GROUPS = ["system:serviceaccounts", "system:serviceaccounts:{ns}", "system:authenticated"]


def sa_entry(ns, sa, audiences=("istio-ca",), groups=None):
    """A TOKENS.json entry for the service account ns/sa, as a projected token would review."""
    return {
        "username": f"system:serviceaccount:{ns}:{sa}",
        "groups": [g.format(ns=ns) for g in SA_GROUPS] if groups is None else list(groups),
        "audiences": list(audiences),
        "extra": {
            "authentication.kubernetes.io/pod-name": [f"{sa}-pod"],
            "authentication.kubernetes.io/pod-uid": [f"uid-{ns}-{sa}"],
        },
    }


def spiffe(ns, sa):
    return f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}"


def fake_jwt(name, subject, audiences, lifetime=7200):
    """A token shaped like a projected service-account JWT (header.claims.signature).

    Only the fake API server judges it (by exact string), so the signature is not real; the
    claims are, as hsmca may read `exp` to bound how long it caches a positive review.
    `name` makes each token distinct.
    """
    import base64

    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"iss": "https://kubernetes.default.svc.cluster.local", "sub": subject,
              "aud": list(audiences), "iat": now, "nbf": now, "exp": now + lifetime,
              "jti": f"test-{name}"}
    return f"{b64({'alg': 'RS256', 'kid': 'test'})}.{b64(claims)}.c2lnbmF0dXJlLW9mLXtuYW1lfQ"


def _sa_token(name, ns, sa, audiences=("istio-ca",), groups=None):
    token = fake_jwt(name, f"system:serviceaccount:{ns}:{sa}", audiences)
    return token, sa_entry(ns, sa, audiences=audiences, groups=groups)


# Every token the fake API server knows, by a short name. It loads them at its start, so a test
# that needs a token nobody used before (the cache test) has its own entry here.
_TOKEN_TABLE = {
    "foo-httpbin": _sa_token("foo-httpbin", "foo", "httpbin"),
    "wrong-audience": _sa_token("wrong-audience", "foo", "httpbin", audiences=["other"]),
    # A user, not a service account: no system:serviceaccounts group.
    "user-alice": (fake_jwt("user-alice", "alice", ["istio-ca"]),
                   {"username": "alice", "groups": ["system:authenticated"],
                    "audiences": ["istio-ca"], "extra": {}}),
    # Claims a service-account username but lacks the system:serviceaccounts group.
    "sa-name-without-group": _sa_token("sa-name-without-group", "foo", "sneaky",
                                       groups=["system:authenticated"]),
    "ztunnel": _sa_token("ztunnel", "istio-system", "ztunnel"),
    "cache-fresh": _sa_token("cache-fresh", "foo", "cached"),
    "plaintext": _sa_token("plaintext", "foo", "httpbin"),
    # Policy and audit tests (test_policy.py, test_audit.py).
    "kube-system-coredns": _sa_token("kube-system-coredns", "kube-system", "coredns"),
    "payments-checkout": _sa_token("payments-checkout", "payments", "checkout"),
    "legacy-app": _sa_token("legacy-app", "legacy", "app"),
    "bar-web": _sa_token("bar-web", "bar", "web"),
}
TOKEN = {name: tok for name, (tok, _) in _TOKEN_TABLE.items()}
API_SERVER_TOKENS = {tok: entry for tok, entry in _TOKEN_TABLE.values()}
GOOD_TOKEN = TOKEN["foo-httpbin"]  # foo/httpbin, audience istio-ca
UNKNOWN_TOKEN = fake_jwt("unknown", "system:serviceaccount:foo:httpbin", ["istio-ca"])


# --------------------------------------------------------------------------------------------
# Processes


class OutputWatcher:
    """Drains a process's pipe on a thread, keeping the lines for matching and diagnostics."""

    def __init__(self, stream, name):
        self.lines = []
        self.name = name
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream):
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, pattern, timeout):
        """The first match of `pattern` in any line, waiting up to `timeout` seconds."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(left)

    def text(self):
        with self._cond:
            return "\n".join(self.lines)


class FakeKube:
    """tests/support/fake_kube_apiserver.py run in `directory` with the given tokens."""

    def __init__(self, directory, tokens):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        tokens_path = os.path.join(directory, "tokens.json")
        with open(tokens_path, "w") as f:
            json.dump(tokens, f)
        self.proc = subprocess.Popen(
            [sys.executable, FAKE_KUBE, "--dir", directory, "--tokens", tokens_path],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.out = OutputWatcher(self.proc.stdout, "fake-kube")
        m = self.out.wait_for(r"listening on (\d+)", 30)
        if not m:
            self.proc.kill()
            raise RuntimeError("fake kube-apiserver did not start:\n" + self.out.text())
        self.port = int(m.group(1))
        self.kubeconfig = os.path.join(directory, "kubeconfig")
        self.ca = os.path.join(directory, "ca.pem")

    def reviews(self):
        """How many TokenReviews the fake API server has answered so far."""
        ctx = ssl.create_default_context(cafile=self.ca)
        with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/stats", context=ctx, timeout=10) as r:
            return json.load(r)["tokenreviews"]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class DevServer:
    """One `hsmca dev` process on ephemeral ports."""

    def __init__(self, state_dir, kubeconfig, env=None, plaintext=False, log_path=None, startup_timeout=180,
                 extra_args=()):
        self.state_dir = state_dir
        args = [
            HSMCA, "dev",
            "--state-dir", state_dir,
            "--listen", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            "--kubeconfig", kubeconfig,
        ]
        if plaintext:
            args += ["--plaintext-listen", "127.0.0.1:0"]
        args += list(extra_args)
        full_env = dict(os.environ)
        # Keep the suite hermetic: only what the test asks for.
        for k in ("TOKEN_AUDIENCES", "MAX_WORKLOAD_CERT_TTL", "DEFAULT_WORKLOAD_CERT_TTL",
                  "CA_TRUSTED_NODE_ACCOUNTS", "CLUSTER_ID", "TRUST_DOMAIN", "KUBECONFIG"):
            full_env.pop(k, None)
        full_env.setdefault("RUST_LOG", "info")
        full_env.update(env or {})
        self.log_path = log_path
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
        self.out = OutputWatcher(self.proc.stdout, "stdout")
        self.err = OutputWatcher(self.proc.stderr, "stderr")
        m = self.out.wait_for(r"serving CreateCertificate on 127\.0\.0\.1:(\d+) \(TLS\)", startup_timeout)
        if not m:
            self.kill()
            raise RuntimeError(f"hsmca dev did not start:\n{self.diagnostics()}")
        self.port = int(m.group(1))
        m = self.out.wait_for(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", 10)
        assert m, self.diagnostics()
        self.metrics_url = m.group(1)
        self.plaintext_port = None
        if plaintext:
            m = self.out.wait_for(r"plaintext \(debug\) on 127\.0\.0\.1:(\d+)", 10)
            assert m, self.diagnostics()
            self.plaintext_port = int(m.group(1))
        self.root_pem = read(os.path.join(state_dir, "root-cert.pem"))
        self.intermediate_pem = read(os.path.join(state_dir, "ca-cert.pem"))

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def alive(self):
        return self.proc.poll() is None

    def diagnostics(self):
        return (f"exit={self.proc.poll()}\n--- stdout ---\n{self.out.text()}\n"
                f"--- stderr ---\n{self.err.text()[-8000:]}")

    def metrics(self):
        """Prometheus text exposition -> {series name without labels: summed value}."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
            if m:
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
        return values

    def stop(self):
        """SIGTERM to the `hsmca dev` process, wait, and return its exit code.

        `hsmca dev` may run the server in a child process (it re-runs itself with SOFTHSM2_CONF);
        any such descendant still alive after the process we started has exited is recorded in
        `self.orphans` (and then stopped by its pid, so the suite leaks nothing).
        """
        self.orphans = []
        if self.proc.poll() is None:
            descendants = _descendants(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"hsmca dev ignored SIGTERM for 30 s\n{self.diagnostics()}")
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(_running(p) for p in descendants):
                time.sleep(0.1)
            self.orphans = [p for p in descendants if _running(p)]
            for p in self.orphans:
                _terminate(p)
        time.sleep(0.1)  # let the reader threads collect the last lines
        if self.log_path:
            with open(self.log_path, "w") as f:
                f.write(self.diagnostics())
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            descendants = _descendants(self.proc.pid)
            self.proc.kill()
            self.proc.wait()
            for p in descendants:
                _terminate(p)


def _stat(pid):
    """(state, ppid) of a process from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _running(pid):
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _descendants(pid):
    """Every live descendant of `pid` (scanning /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st:
                parents[int(entry)] = st[1]
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def _terminate(pid):
    """Stop a leftover process of ours by pid: SIGTERM, then SIGKILL after 10 s."""
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(pid):
            time.sleep(0.1)
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def hsmca(*args, env=None, timeout=60):
    """Run the hsmca binary with `args`; returns the CompletedProcess (text, both streams)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([HSMCA, *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


# --------------------------------------------------------------------------------------------
# gRPC


class Client:
    """A CreateCertificate client generated from proto/istio/ca.proto."""

    def __init__(self, pb2, pb2_grpc, struct_pb2):
        self.pb2 = pb2
        self.pb2_grpc = pb2_grpc
        self.struct_pb2 = struct_pb2
        self._channels = []

    def channel(self, target, root_pem=None, key_pem=None, chain_pem=None, plaintext=False):
        if plaintext:
            ch = grpc.insecure_channel(target)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_b(root_pem),
                private_key=_b(key_pem),
                certificate_chain=_b(chain_pem),
            )
            ch = grpc.secure_channel(target, creds)
        self._channels.append(ch)
        return ch

    def create(self, channel, csr_pem, token=None, validity=0, cluster_ids=(), metadata_struct=None,
               extra_md=(), timeout=20):
        """CreateCertificate; returns the list of PEM strings, raises grpc.RpcError."""
        stub = self.pb2_grpc.IstioCertificateServiceStub(channel)
        req = self.pb2.IstioCertificateRequest(csr=_s(csr_pem), validity_duration=validity)
        if metadata_struct is not None:
            s = self.struct_pb2.Struct()
            s.update(metadata_struct)
            req.metadata.CopyFrom(s)
        md = []
        if token is not None:
            md.append(("authorization", f"Bearer {token}"))
        for cid in cluster_ids:
            md.append(("clusterid", cid))
        md.extend(extra_md)
        resp = stub.CreateCertificate(req, metadata=md or None, timeout=timeout)
        return list(resp.cert_chain)

    def close(self):
        for ch in self._channels:
            ch.close()
        self._channels.clear()


def _b(v):
    if v is None:
        return None
    return v.encode() if isinstance(v, str) else v


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def compile_proto(out_dir):
    """Compile ca.proto with grpc_tools into out_dir and import the generated modules."""
    import grpc_tools
    wkt = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    res = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{wkt}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", PROTO_FILE],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, f"protoc failed: {res.stderr}"
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    import importlib
    pb2 = importlib.import_module("istio.ca_pb2")
    pb2_grpc = importlib.import_module("istio.ca_pb2_grpc")
    from google.protobuf import struct_pb2
    return pb2, pb2_grpc, struct_pb2


# --------------------------------------------------------------------------------------------
# Keys and CSRs


def new_key(kind="p256"):
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    raise ValueError(kind)


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def make_csr(key=None, cn=None, dns=(), uris=(), org=None):
    """A PEM CSR for `key` (a new P-256 key when None); returns (key, csr_pem)."""
    key = key or new_key()
    attrs = []
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    if cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    sans = [x509.DNSName(d) for d in dns] + [x509.UniformResourceIdentifier(u) for u in uris]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    csr = b.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def corrupt_csr_signature(csr_pem):
    """The same CSR with one byte of its signature flipped, re-encoded as PEM.

    The signature BIT STRING is the last element of the CertificationRequest SEQUENCE, so the
    last byte of the DER is inside the signature value (for ECDSA: the last byte of `s`).
    """
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    sig = csr.signature
    assert bytes(der[-len(sig):]) == sig, "signature is not the DER's tail"
    der[-1] ^= 0x01
    bad = x509.load_der_x509_csr(bytes(der))  # still well-formed ...
    assert not bad.is_signature_valid  # ... but its signature no longer verifies
    return bad.public_bytes(serialization.Encoding.PEM).decode()


# --------------------------------------------------------------------------------------------
# Certificate checks


def load_chain(chain):
    """Parse a cert_chain response; each element must be exactly one PEM certificate."""
    certs = []
    for i, pem in enumerate(chain):
        assert pem.count("-----BEGIN CERTIFICATE-----") == 1, f"element {i} is not one PEM cert:\n{pem}"
        certs.append(x509.load_pem_x509_certificate(pem.encode()))
    return certs


def san_strings(cert):
    """Every SAN as 'TYPE:value' (empty when the extension is absent)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    out = []
    for gn in ext.value:
        kind = {x509.DNSName: "DNS", x509.UniformResourceIdentifier: "URI", x509.IPAddress: "IP",
                x509.RFC822Name: "EMAIL"}.get(type(gn), type(gn).__name__)
        out.append(f"{kind}:{gn.value}")
    return out


def lifetime(cert):
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def openssl_verify(tmp_path, leaf_pem, intermediate_pem, root_file, purpose=None):
    leaf_f = tmp_path / "leaf.pem"
    inter_f = tmp_path / "intermediate.pem"
    leaf_f.write_text(leaf_pem)
    inter_f.write_text(intermediate_pem)
    args = ["openssl", "verify", "-CAfile", str(root_file), "-untrusted", str(inter_f)]
    if purpose:
        args += ["-purpose", purpose]
    res = subprocess.run(args + [str(leaf_f)], capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr


# pkilint's URI validator does not know the `spiffe` scheme, so it reports the SPIFFE URI SAN
# (spiffe://cluster.local/ns/.../sa/...) as `pkix.invalid_uri_syntax`. That is a limitation of
# the linter, not of the certificate: this one finding, by name, is ignored; nothing else is.
PKILINT_IGNORED = {"pkix.invalid_uri_syntax"}


def pkilint_errors(tmp_path, cert_pem):
    """ERROR-or-worse findings of `lint_pkix_cert lint -s ERROR`, minus the ignored one."""
    f = tmp_path / "lint-me.pem"
    f.write_text(cert_pem)
    res = subprocess.run(["lint_pkix_cert", "lint", "-s", "ERROR", "-f", "JSON", str(f)],
                         capture_output=True, text=True)
    assert res.stdout.strip() or res.returncode == 0, f"pkilint failed: {res.stderr}"
    findings = []
    if res.stdout.strip():
        doc = json.loads(res.stdout)
        for result in doc.get("results", []):
            for fd in result.get("finding_descriptions", []):
                code = fd.get("code")
                if code in PKILINT_IGNORED:
                    continue
                findings.append(f"{fd.get('severity')} {code} at {result.get('node_path')}: {fd.get('message')}")
    return findings


_PKILINT_VALIDATOR = None


def _pkilint_findings(doc):
    findings = []
    for result in doc.get("results", []):
        for fd in result.get("finding_descriptions", []):
            code = fd.get("code")
            if code in PKILINT_IGNORED:
                continue
            findings.append(f"{fd.get('severity')} {code} at {result.get('node_path')}: {fd.get('message')}")
    return findings


def pkilint_errors_many(cert_pems):
    """pkilint_errors for many certificates at once: {index: findings} for those with findings.

    Runs the same validators as `lint_pkix_cert lint -s ERROR -f JSON` (pkilint's own CLI
    module builds them this way), in this process, so linting hundreds of leaves takes seconds
    rather than a process start each.
    """
    global _PKILINT_VALIDATOR
    import io
    from pkilint import loader, report, validation
    from pkilint.pkix import certificate, extension, name

    if _PKILINT_VALIDATOR is None:
        _PKILINT_VALIDATOR = certificate.create_pkix_certificate_validator_container(
            certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS),
            [
                certificate.create_issuer_validator_container([]),
                certificate.create_validity_validator_container(),
                certificate.create_subject_validator_container([]),
                certificate.create_extensions_validator_container([]),
                certificate.create_spki_validator_container([]),
            ],
        )
    load = loader.RFC5280CertificateDocumentLoader().get_file_loader_func(loader.DocumentFormat.DETECT)
    bad = {}
    for i, pem in enumerate(cert_pems):
        cert = load(io.BytesIO(_b(pem)), f"leaf-{i}.pem")
        results = _PKILINT_VALIDATOR.validate(cert.root)
        doc = json.loads(report.ReportGeneratorJson(results, validation.ValidationFindingSeverity.ERROR).generate())
        findings = _pkilint_findings(doc)
        if findings:
            bad[i] = findings
    return bad


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc)


def rpc_error(fn, *args, **kwargs):
    """Call `fn` and return the grpc.RpcError it raises (fails the test if it succeeds)."""
    try:
        result = fn(*args, **kwargs)
    except grpc.RpcError as e:
        return e
    import pytest
    pytest.fail(f"expected an RPC error, got a response: {result!r}"[:2000])


# --------------------------------------------------------------------------------------------
# gRPC health (grpc.health.v1.Health/Check), without grpcio-health-checking: the request and
# response are built and parsed by hand (HealthCheckRequest{string service = 1},
# HealthCheckResponse{ServingStatus status = 1}).

HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
CA_SERVICE = "istio.v1.auth.IstioCertificateService"


def varint(n):
    """A protobuf base-128 varint (for hand-encoded wire messages)."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def health_status(channel, service="", timeout=2):
    """grpc.health.v1.Health/Check for `service`: 'SERVING', 'NOT_SERVING', ... (raises grpc.RpcError)."""
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    data = service.encode()
    req = b"\x0a" + varint(len(data)) + data if data else b""
    resp = check(req, timeout=timeout)
    status, i = 0, 0
    while i < len(resp):  # field 1, varint; anything else is skipped by wire type
        key = resp[i]
        i += 1
        if key & 7 == 0:
            val, shift = 0, 0
            while True:
                b = resp[i]
                i += 1
                val |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            if key >> 3 == 1:
                status = val
        else:
            raise ValueError(f"unexpected wire type in HealthCheckResponse: {resp!r}")
    return HEALTH_STATUS.get(status, str(status))


def require_tool(ok, why):
    """Skip the calling test with `why` when `ok` is false, or fail under HSMCA_REQUIRE_TOOLS=1."""
    if ok:
        return
    import pytest
    if os.environ.get("HSMCA_REQUIRE_TOOLS"):
        pytest.fail(f"{why} (HSMCA_REQUIRE_TOOLS is set)")
    pytest.skip(why)
