"""Policy (`hsmca dev --policy FILE`): deny rules, rule lifetimes and key types, authenticators,
DNS SAN templates, `hsmca policy check`, hot reload (polling and SIGHUP) under load.

Two dedicated `hsmca dev` instances, each with its own state directory:
  * `policy_dev` serves POLICY (adapted from examples/policy/policy.toml to the fake tokens);
  * `reload_dev` runs with CLUSTER_ID=prod-east and has its policy file rewritten by the tests.
Every leaf issued here is linted with pkilint (only pkix.invalid_uri_syntax ignored).
"""

import concurrent.futures
import datetime
import hashlib
import json
import os
import re
import signal
import threading
import time

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

import hsmca_testlib as L

SPIFFE_TEMPLATE = "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"

POLICY = f"""\
version = 1
trust_domain = "cluster.local"

[defaults]
lifetime = "24h"
max_lifetime = "48h"
min_lifetime = "5m"
key_types = ["ecdsa-p256", "rsa-2048"]
csr_sans = "ignore"

[[deny]]
name = "no-kube-system"
namespaces = ["kube-system"]
reason = "workloads in kube-system get no mesh identity"

[[rule]]
name = "payments"
authenticators = ["kube-jwt"]
clusters = ["Kubernetes"]
namespaces = ["payments"]
service_accounts = ["*"]
uri_sans = ["{SPIFFE_TEMPLATE}"]
dns_sans = ["{{service_account}}.{{namespace}}.svc"]
max_lifetime = "1h"
key_types = ["ecdsa-p256"]

[[rule]]
name = "legacy-mtls-only"
authenticators = ["client-cert"]
namespaces = ["legacy"]
uri_sans = ["{SPIFFE_TEMPLATE}"]

[[rule]]
name = "mesh"
authenticators = ["kube-jwt", "client-cert"]
clusters = ["*"]
namespaces = ["foo", "bar"]
service_accounts = ["*"]
uri_sans = ["{SPIFFE_TEMPLATE}"]
dns_sans = ["{{service_account}}.{{namespace}}.svc"]
"""

KUBE_SYSTEM = L.TOKEN["kube-system-coredns"]
PAYMENTS = L.TOKEN["payments-checkout"]
LEGACY = L.TOKEN["legacy-app"]
FOO = L.GOOD_TOKEN
BAR = L.TOKEN["bar-web"]

SKEW = datetime.timedelta(seconds=120)
TOLERANCE = datetime.timedelta(seconds=5)
NO_HSM = {"SOFTHSM2_CONF": "/nonexistent/hsmca-test/softhsm2.conf"}


# --------------------------------------------------------------------------------------------
# Helpers


def _assert_clean_stop(name, server):
    rc = server.stop()
    assert rc == 0 and not server.orphans, (
        f"{name}: exit code {rc} on SIGTERM (want 0), leftover processes {server.orphans}\n"
        f"{server.diagnostics()}")


def _assert_audit_verifies(server):
    res = L.hsmca("audit", "verify", os.path.join(server.state_dir, "audit"))
    assert res.returncode == 0, f"audit log of {server.state_dir} does not verify:\n{res.stdout}{res.stderr}"


def _audit_records(server):
    with open(os.path.join(server.state_dir, "audit", "audit-000001.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _lint_clean(chain):
    assert L.pkilint_errors_many([chain[0]]) == {}, chain[0]


def _issue(client, ch, token=None, key=None, validity=0, **csr_kw):
    """A certificate that must be issued: returns (leaf, chain); the leaf passes pkilint."""
    key = key or L.new_key()
    _, csr = L.make_csr(key, **csr_kw)
    chain = client.create(ch, csr, token=token, validity=validity)
    assert len(chain) == 3, chain
    leaf = L.load_chain(chain)[0]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    _lint_clean(chain)
    return leaf, chain


def _refused(client, ch, code, token=None, key=None, validity=0, csr=None, **csr_kw):
    """A request that must be refused with `code`: returns the status message."""
    if csr is None:
        _, csr = L.make_csr(key, **csr_kw)
    err = L.rpc_error(client.create, ch, csr, token=token, validity=validity)
    assert err.code() == code, (err.code(), err.details())
    return err.details() or ""


def _lifetime_ok(leaf, expected):
    got = L.lifetime(leaf)
    assert abs(got - (expected + SKEW)) <= TOLERANCE, f"lifetime {got}, expected {expected} + 120 s"


def _write_atomic(path, text, mtime_ns=None):
    """Replace `path` with `text` in one rename; optionally give it the modification time `mtime_ns`."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, path)


def _count(server, pattern):
    rx = re.compile(pattern)
    return sum(1 for line in server.err.text().splitlines() if rx.search(line))


def _wait_count(server, pattern, above, timeout=15):
    """Wait until the server's log has more than `above` lines matching `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _count(server, pattern) > above:
            return
        time.sleep(0.05)
    pytest.fail(f"no new log line matching {pattern!r} within {timeout} s\n{server.diagnostics()}")


RELOADED = r"policy reloaded"
INVALID = r"policy file is invalid; the previous policy stays in force"


# --------------------------------------------------------------------------------------------
# The server with POLICY


@pytest.fixture(scope="module")
def policy_file(workdir):
    path = workdir / "policy.toml"
    path.write_text(POLICY)
    return str(path)


@pytest.fixture(scope="module")
def policy_dev(workdir, kube, client, policy_file):
    state = str(workdir / "policy-state")
    # Bootstrap with Istio's default policy on the same state dir (not at the same time): a
    # legacy/app certificate, which POLICY never gives to a token, for the client-cert tests.
    boot = L.DevServer(state, kube.kubeconfig, log_path=str(workdir / "dev-policy-boot.log"))
    try:
        legacy_key = L.new_key()
        _, legacy_chain = _issue(client, client.channel(boot.target, boot.root_pem), LEGACY, legacy_key)
    finally:
        _assert_clean_stop("bootstrap hsmca dev", boot)
    server = L.DevServer(state, kube.kubeconfig, extra_args=["--policy", policy_file],
                         log_path=str(workdir / "dev-policy.log"))
    server.legacy = (legacy_key, legacy_chain)
    yield server
    try:
        assert server.alive(), server.diagnostics()
    finally:
        _assert_clean_stop("policy hsmca dev", server)
    _assert_audit_verifies(server)  # one chain over both runs on this state dir


@pytest.fixture
def pchan(client, policy_dev):
    return client.channel(policy_dev.target, policy_dev.root_pem)


def test_denied_namespace_permission_denied_names_rule(client, pchan):
    details = _refused(client, pchan, grpc.StatusCode.PERMISSION_DENIED, KUBE_SYSTEM)
    assert details == "denied by no-kube-system: workloads in kube-system get no mesh identity"
    # A deny rule wins whatever is asked for.
    details = _refused(client, pchan, grpc.StatusCode.PERMISSION_DENIED, KUBE_SYSTEM, validity=600,
                       dns=["coredns.kube-system.svc"])
    assert details.startswith("denied by no-kube-system: "), details


def test_rule_max_lifetime_is_enforced(client, pchan):
    details = _refused(client, pchan, grpc.StatusCode.PERMISSION_DENIED, PAYMENTS, validity=7200)
    assert details.startswith("denied by payments: "), details
    assert "max_lifetime" in details and "1h" in details, details
    # Exactly the rule's maximum is fine, and with no lifetime asked the rule caps the default.
    leaf, _ = _issue(client, pchan, PAYMENTS, validity=3600)
    _lifetime_ok(leaf, datetime.timedelta(hours=1))
    leaf, _ = _issue(client, pchan, PAYMENTS)
    _lifetime_ok(leaf, datetime.timedelta(hours=1))
    # The same 2h is fine under a rule without the tighter cap.
    leaf, _ = _issue(client, pchan, FOO, validity=7200)
    _lifetime_ok(leaf, datetime.timedelta(hours=2))
    leaf, _ = _issue(client, pchan, FOO)
    _lifetime_ok(leaf, datetime.timedelta(hours=24))


def test_defaults_bound_every_request_invalid_argument(client, pchan):
    details = _refused(client, pchan, grpc.StatusCode.INVALID_ARGUMENT, FOO, validity=49 * 3600)
    assert details.startswith("denied by defaults.max_lifetime: "), details
    details = _refused(client, pchan, grpc.StatusCode.INVALID_ARGUMENT, FOO, validity=60)
    assert details.startswith("denied by defaults.min_lifetime: "), details
    details = _refused(client, pchan, grpc.StatusCode.INVALID_ARGUMENT, FOO,
                       key=ec.generate_private_key(ec.SECP384R1()))
    assert details.startswith("denied by defaults.key_types: "), details
    assert "ecdsa-p384" in details, details
    # The defaults come before the deny rules: the request itself is out of bounds.
    details = _refused(client, pchan, grpc.StatusCode.INVALID_ARGUMENT, KUBE_SYSTEM, validity=49 * 3600)
    assert details.startswith("denied by defaults.max_lifetime: "), details


def test_rule_key_types(client, pchan):
    details = _refused(client, pchan, grpc.StatusCode.PERMISSION_DENIED, PAYMENTS, key=L.new_key("rsa2048"))
    assert details.startswith("denied by payments: "), details
    assert "rsa-2048" in details, details
    leaf, _ = _issue(client, pchan, FOO, key=L.new_key("rsa2048"))
    assert leaf.public_key().key_size == 2048


def test_token_caller_refused_where_only_client_cert_is_allowed(client, pchan):
    details = _refused(client, pchan, grpc.StatusCode.PERMISSION_DENIED, LEGACY)
    assert details == ("denied by no-matching-rule: "
                       "no rule allows the kube-jwt caller Kubernetes/legacy/app"), details


def test_client_cert_caller_allowed_only_where_the_rule_allows_it(client, policy_dev, pchan):
    # legacy/app renews with its certificate: rule legacy-mtls-only allows client-cert callers.
    key, chain = policy_dev.legacy
    mtls = client.channel(policy_dev.target, policy_dev.root_pem, key_pem=L.key_pem(key),
                          chain_pem=chain[0] + chain[1])
    leaf, _ = _issue(client, mtls)
    assert L.san_strings(leaf) == [f"URI:{L.spiffe('legacy', 'app')}"]

    # payments/checkout has a certificate from this CA, but rule payments allows only kube-jwt.
    pkey = L.new_key()
    _, pchain = _issue(client, pchan, PAYMENTS, key=pkey)
    mtls = client.channel(policy_dev.target, policy_dev.root_pem, key_pem=L.key_pem(pkey),
                          chain_pem=pchain[0] + pchain[1])
    details = _refused(client, mtls, grpc.StatusCode.PERMISSION_DENIED)
    assert details.startswith("denied by no-matching-rule: "), details
    assert "client-cert caller" in details and "payments/checkout" in details, details

    # foo/httpbin renews under rule mesh, which allows both.
    fkey = L.new_key()
    _, fchain = _issue(client, pchan, FOO, key=fkey)
    mtls = client.channel(policy_dev.target, policy_dev.root_pem, key_pem=L.key_pem(fkey),
                          chain_pem=fchain[0] + fchain[1])
    leaf, _ = _issue(client, mtls)
    assert L.san_strings(leaf) == [f"URI:{L.spiffe('foo', 'httpbin')}"]


@pytest.mark.parametrize(
    "token,asked,expected_dns",
    [
        (PAYMENTS, ["checkout.payments.svc"], ["checkout.payments.svc"]),
        (PAYMENTS, ["other.payments.svc"], []),
        (PAYMENTS, ["evil.example.com", "checkout.payments.svc"], ["checkout.payments.svc"]),
        (PAYMENTS, ["checkout.payments.svc.cluster.local"], []),
        (PAYMENTS, [], []),
        (FOO, ["httpbin.foo.svc"], ["httpbin.foo.svc"]),
        (FOO, ["checkout.payments.svc"], []),  # another workload's rendered name
    ],
    ids=["exact", "other-name", "extra-and-exact", "longer-name", "none", "mesh-exact", "not-mine"],
)
def test_dns_san_template_only_when_asked_exactly(client, pchan, tmp_path, token, asked, expected_dns):
    leaf, chain = _issue(client, pchan, token, dns=asked)
    assert L.pkilint_errors(tmp_path, chain[0]) == []  # also through the lint_pkix_cert CLI
    ns_sa = ("payments", "checkout") if token == PAYMENTS else ("foo", "httpbin")
    sans = L.san_strings(leaf)
    assert sorted(sans) == sorted([f"URI:{L.spiffe(*ns_sa)}"] + [f"DNS:{d}" for d in expected_dns]), sans
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # the subject is still empty


# --------------------------------------------------------------------------------------------
# hsmca policy check: the same decisions, explained, without an HSM


CHECK_CASES = [
    # id, caller, CLI options, CSR (key kind, dns), token+validity for the server, exit code, rule,
    # what the output must say.
    ("deny-rule", "kube-jwt:Kubernetes/kube-system/coredns", [], None, (KUBE_SYSTEM, 0),
     3, "no-kube-system", ["status:   PermissionDenied",
                           "reason:   workloads in kube-system get no mesh identity"]),
    ("rule-max-lifetime", "kube-jwt:Kubernetes/payments/checkout", ["--ttl", "2h"], None,
     (PAYMENTS, 7200), 3, "payments", ["status:   PermissionDenied", "max_lifetime 1h"]),
    ("rule-lifetime-ok", "kube-jwt:Kubernetes/payments/checkout", ["--ttl", "1h"], None,
     (PAYMENTS, 3600), 0, "payments", ["lifetime:           1h"]),
    ("defaults-max-lifetime", "kube-jwt:Kubernetes/payments/checkout", ["--ttl", "49h"], None,
     (PAYMENTS, 49 * 3600), 3, "defaults.max_lifetime", ["status:   InvalidArgument"]),
    ("defaults-key-type", "kube-jwt:Kubernetes/foo/httpbin", ["--key-type", "ecdsa-p384"], None,
     None, 3, "defaults.key_types", ["status:   InvalidArgument"]),
    ("rule-key-type", "kube-jwt:Kubernetes/payments/checkout", [], ("rsa2048", []), (PAYMENTS, 0),
     3, "payments", ["status:   PermissionDenied", "rsa-2048"]),
    ("authenticator-not-allowed", "kube-jwt:Kubernetes/legacy/app", [], None, (LEGACY, 0),
     3, "no-matching-rule", ["status:   PermissionDenied",
                             "no rule allows the kube-jwt caller Kubernetes/legacy/app"]),
    ("client-cert-allowed", "client-cert:-/legacy/app", [], None, None,
     0, "legacy-mtls-only", ["URI SANs:           spiffe://cluster.local/ns/legacy/sa/app"]),
    ("dns-exact", "kube-jwt:Kubernetes/payments/checkout", [], ("p256", ["checkout.payments.svc"]),
     (PAYMENTS, 0), 0, "payments", ["DNS SANs:           checkout.payments.svc"]),
    ("dns-other", "kube-jwt:Kubernetes/payments/checkout", [], ("p256", ["other.payments.svc"]),
     (PAYMENTS, 0), 0, "payments", ["DNS SANs:           (none)"]),
]


@pytest.mark.parametrize("case", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_policy_check_explains_without_hsm(client, pchan, policy_file, tmp_path, case):
    _, caller, options, csr_spec, server_req, want_rc, rule, says = case
    args = ["policy", "check", "--policy", policy_file, "--caller", caller, *options]
    csr = None
    if csr_spec:
        kind, dns = csr_spec
        _, csr = L.make_csr(L.new_key(kind), dns=dns)
        (tmp_path / "req.csr").write_text(csr)
        args += ["--csr", str(tmp_path / "req.csr")]
    res = L.hsmca(*args, env=NO_HSM)
    out = res.stdout
    assert res.returncode == want_rc, f"exit {res.returncode}, want {want_rc}\n{out}\n{res.stderr}"
    assert res.stderr.strip() == "", res.stderr
    if want_rc == 0:
        assert f'decision: ALLOW by rule "{rule}"' in out, out
    else:
        assert f"decision: DENY by {rule}\n" in out, out
    for text in says:
        assert text in out, out

    # The server decides the same for the same request.
    if server_req is None:
        return
    token, validity = server_req
    if csr is None:
        _, csr = L.make_csr()
    if want_rc == 0:
        chain = client.create(pchan, csr, token=token, validity=validity)
        _lint_clean(chain)
        leaf = L.load_chain(chain)[0]
        uri = re.search(r"URI SANs: +(.*)", out).group(1).split(", ")
        dns = re.search(r"DNS SANs: +(.*)", out).group(1)
        dns = [] if dns == "(none)" else dns.split(", ")
        assert sorted(L.san_strings(leaf)) == sorted([f"URI:{u}" for u in uri] + [f"DNS:{d}" for d in dns])
    else:
        err = L.rpc_error(client.create, pchan, csr, token=token, validity=validity)
        reason = re.search(r"^reason: +(.*)$", out, re.M).group(1)
        assert err.details() == f"denied by {rule}: {reason}", (err.details(), out)
        status = re.search(r"^status: +(\w+)$", out, re.M).group(1)
        want = {"PermissionDenied": grpc.StatusCode.PERMISSION_DENIED,
                "InvalidArgument": grpc.StatusCode.INVALID_ARGUMENT}[status]
        assert err.code() == want, (err.code(), out)


def test_policy_check_reports_bad_policy_file_with_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(POLICY.replace('max_lifetime = "1h"', 'max_lifetime = "1000d"'))
    res = L.hsmca("policy", "check", "--policy", bad, "--caller", "kube-jwt:Kubernetes/foo/httpbin",
                  env=NO_HSM)
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    line = POLICY.splitlines().index("[[rule]]") + 1  # the payments rule starts there
    assert f"{bad}:{line}:" in res.stderr and "loosens" in res.stderr, res.stderr


def test_policy_check_example_policy(tmp_path):
    example = os.path.join(L.REPO, "examples", "policy", "policy.toml")
    res = L.hsmca("policy", "check", "--policy", example, "--caller", "kube-jwt:prod-eu/payments/checkout",
                  "--ttl", "30m", env=NO_HSM)
    assert res.returncode == 0, res.stdout + res.stderr
    assert 'decision: ALLOW by rule "payments"' in res.stdout, res.stdout
    res = L.hsmca("policy", "check", "--policy", example, "--caller", "kube-jwt:prod-eu/kube-system/x",
                  env=NO_HSM)
    assert res.returncode == 3 and "DENY by no-kube-system" in res.stdout, res.stdout + res.stderr


def test_policy_check_agrees_with_server_for_cluster_bound_client_cert_rule(client, kube, workdir, tmp_path):
    # A client-certificate caller carries no cluster on the server; policy check says so
    # instead of guessing, and with "-" as the cluster it decides as the server does.
    policy = POLICY.replace('name = "legacy-mtls-only"\n', 'name = "legacy-mtls-only"\nclusters = ["Kubernetes"]\n')
    path = tmp_path / "cluster-bound.toml"
    path.write_text(policy)
    res = L.hsmca("policy", "check", "--policy", path, "--caller", "client-cert:Kubernetes/legacy/app",
                  env=NO_HSM)
    assert res.returncode == 1 and "carries no cluster" in res.stderr, res.stdout + res.stderr
    res = L.hsmca("policy", "check", "--policy", path, "--caller", "client-cert:-/legacy/app",
                  env=NO_HSM)
    assert res.returncode in (0, 3), res.stdout + res.stderr
    cli_allows = res.returncode == 0
    state = str(workdir / "cluster-bound-state")
    boot = L.DevServer(state, kube.kubeconfig, log_path=str(workdir / "dev-cluster-bound-boot.log"))
    try:
        key = L.new_key()
        _, chain = _issue(client, client.channel(boot.target, boot.root_pem), LEGACY, key)
    finally:
        _assert_clean_stop("bootstrap hsmca dev", boot)
    server = L.DevServer(state, kube.kubeconfig, extra_args=["--policy", str(path)],
                         log_path=str(workdir / "dev-cluster-bound.log"))
    try:
        mtls = client.channel(server.target, server.root_pem, key_pem=L.key_pem(key),
                              chain_pem=chain[0] + chain[1])
        try:
            client.create(mtls, L.make_csr()[1])
            server_allows, detail = True, ""
        except grpc.RpcError as e:
            server_allows, detail = False, e.details()
    finally:
        _assert_clean_stop("cluster-bound hsmca dev", server)
    assert cli_allows == server_allows, (
        f"policy check: exit {res.returncode}\n{res.stdout}\nserver: "
        f"{'issued' if server_allows else detail}")


# --------------------------------------------------------------------------------------------
# Hot reload


RULE_PROD_MESH = f"""
[[rule]]
name = "prod-mesh"
authenticators = ["kube-jwt", "client-cert"]
clusters = ["prod-*"]
namespaces = ["foo", "bar"]
uri_sans = ["{SPIFFE_TEMPLATE}"]
dns_sans = ["{{service_account}}.{{namespace}}.svc"]
"""

RELOAD_V1 = """\
version = 1
trust_domain = "cluster.local"

[defaults]
lifetime = "24h"
max_lifetime = "48h"
key_types = ["ecdsa-p256", "rsa-2048"]
csr_sans = "ignore"
""" + RULE_PROD_MESH

FREEZE_REASON = "foo is frozen for maintenance"
RELOAD_V2 = RELOAD_V1.replace('csr_sans = "ignore"\n', f'''csr_sans = "ignore"

[[deny]]
name = "freeze-foo"
namespaces = ["foo"]
reason = "{FREEZE_REASON}"
''')
FROZEN = f"denied by freeze-foo: {FREEZE_REASON}"

RELOAD_V3 = RELOAD_V1.replace('csr_sans = "ignore"', 'csr_sans = "deny"')

INVALID_POLICIES = {
    "toml-syntax": RELOAD_V1 + "\n[[rule]\nname = broken\n",
    "loosens-defaults": RELOAD_V1.replace('dns_sans = [', 'max_lifetime = "1000d"\ndns_sans = ['),
    "other-trust-domain": RELOAD_V1.replace('trust_domain = "cluster.local"', 'trust_domain = "other.example"'),
    "empty": "",
}


@pytest.fixture(scope="module")
def reload_dev(workdir, kube):
    path = str(workdir / "reload-policy.toml")
    _write_atomic(path, RELOAD_V1)
    server = L.DevServer(str(workdir / "reload-state"), kube.kubeconfig,
                         env={"CLUSTER_ID": "prod-east"}, extra_args=["--policy", path],
                         log_path=str(workdir / "dev-reload.log"))
    server.policy_path = path
    server.in_force = server.on_disk = RELOAD_V1
    yield server
    try:
        assert server.alive(), server.diagnostics()
    finally:
        _assert_clean_stop("reload hsmca dev", server)
    _assert_audit_verifies(server)


def _install(server, text):
    """Rewrite the policy file with `text` and wait until the server has loaded it."""
    if text == server.in_force == server.on_disk:
        return
    before = _count(server, RELOADED)
    _write_atomic(server.policy_path, text)
    server.on_disk = text
    if text != server.in_force:
        _wait_count(server, RELOADED, before)
        server.in_force = text
    else:
        time.sleep(2.5)  # same policy: nothing to log; let the poller see the file once


@pytest.fixture
def rchan(client, reload_dev):
    return client.channel(reload_dev.target, reload_dev.root_pem)


def test_cluster_id_is_the_local_cluster_in_policy(client, reload_dev, rchan):
    _install(reload_dev, RELOAD_V1)
    # Rule prod-mesh wants clusters prod-*: CLUSTER_ID=prod-east is the token caller's cluster.
    leaf, _ = _issue(client, rchan, FOO, dns=["httpbin.foo.svc"])
    assert sorted(L.san_strings(leaf)) == ["DNS:httpbin.foo.svc", f"URI:{L.spiffe('foo', 'httpbin')}"]


def test_hot_reload_under_load(client, reload_dev, rchan):
    _install(reload_dev, RELOAD_V1)
    results = []  # (started, finished, "ok" | StatusCode, leaf PEM | details)
    lock = threading.Lock()
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            _, csr = L.make_csr()
            started = time.monotonic()
            try:
                chain = client.create(rchan, csr, token=FOO)
                outcome = ("ok", chain[0])
            except grpc.RpcError as e:
                outcome = (e.code(), e.details())
            with lock:
                results.append((started, time.monotonic(), *outcome))

    def wait_until(pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if pred(list(results)):
                    return
            time.sleep(0.01)
        pytest.fail(f"timed out waiting for {what}\n{reload_dev.diagnostics()}")

    reloads = _count(reload_dev, RELOADED)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(worker) for _ in range(8)]
        try:
            wait_until(lambda r: len(r) >= 30, 60, "30 requests under the old policy")
            written = time.monotonic()
            _write_atomic(reload_dev.policy_path, RELOAD_V2)
            reload_dev.on_disk = RELOAD_V2
            _wait_count(reload_dev, RELOADED, reloads)
            seen = time.monotonic()
            reload_dev.in_force = RELOAD_V2
            wait_until(lambda r: sum(1 for x in r if x[0] > seen) >= 30
                       and sum(1 for x in r if x[0] > written) >= 60,
                       60, "requests after the reload")
        finally:
            stop.set()
        for w in workers:
            w.result()

    unexpected = [(c, d) for _, _, c, d in results if c != "ok" and (c, d) != (grpc.StatusCode.PERMISSION_DENIED, FROZEN)]
    assert unexpected == [], f"{len(unexpected)} requests failed otherwise: {unexpected[:5]}"
    # Before the file changed: the old decision; after the reload was logged: the new one.
    assert all(c == "ok" for s, e, c, _ in results if e < written), "denied before the policy changed"
    late_ok = [s for s, _, c, _ in results if s > seen and c == "ok"]
    assert late_ok == [], f"{len(late_ok)} requests started after the reload were still allowed"
    # Once a request was denied, no later one is allowed again.
    first_denied = min(e for _, e, c, _ in results if c != "ok")
    flip = [s for s, _, c, _ in results if c == "ok" and s > first_denied]
    assert flip == [], f"{len(flip)} requests allowed after a denial had been returned"
    in_flight = sum(1 for s, e, _, _ in results if e > written and s < seen)
    leaves = [d for _, _, c, d in results if c == "ok"]
    # The workers never paused: at the write, requests were in flight, and 60 more started after it.
    assert in_flight >= 4, f"only {in_flight} requests were in flight over the change"
    assert len(results) >= 90 and leaves, len(results)
    for pem in leaves:
        assert L.san_strings(x509.load_pem_x509_certificate(pem.encode())) == [f"URI:{L.spiffe('foo', 'httpbin')}"]
    assert L.pkilint_errors_many(leaves) == {}

    # The audit log says which policy decided: the SHA-256 of the policy text in force.
    v1, v2 = (hashlib.sha256(t.encode()).hexdigest() for t in (RELOAD_V1, RELOAD_V2))
    serials = {format(x509.load_pem_x509_certificate(p.encode()).serial_number, "x") for p in leaves}
    records = _audit_records(reload_dev)
    signed = [r for r in records if r["kind"] == "signed" and r["serial"].lstrip("0") in serials]
    assert len(signed) == len(leaves) and {r["policy_version"] for r in signed} == {v1}
    frozen = [r for r in records if r["kind"] == "decision" and r.get("reason") == FROZEN]
    assert len(frozen) == len(results) - len(leaves)
    assert {(r["policy_version"], r["policy_rule"], r["status"]) for r in frozen} == {(v2, "freeze-foo", "PermissionDenied")}

    # The new policy applies: foo frozen, bar unaffected.
    assert _refused(client, rchan, grpc.StatusCode.PERMISSION_DENIED, FOO) == FROZEN
    leaf, _ = _issue(client, rchan, BAR)
    assert L.san_strings(leaf) == [f"URI:{L.spiffe('bar', 'web')}"]


def test_invalid_policy_keeps_previous(client, reload_dev, rchan):
    _install(reload_dev, RELOAD_V2)
    for name, text in INVALID_POLICIES.items():
        errors = _count(reload_dev, INVALID)
        _write_atomic(reload_dev.policy_path, text)
        reload_dev.on_disk = text
        _wait_count(reload_dev, INVALID, errors)
        last = [line for line in reload_dev.err.text().splitlines() if re.search(INVALID, line)][-1]
        assert reload_dev.policy_path in last, f"{name}: the error does not name the file: {last}"
        # Still the previous policy (V2), not V1 and not nothing.
        assert _refused(client, rchan, grpc.StatusCode.PERMISSION_DENIED, FOO) == FROZEN, name
        _issue(client, rchan, BAR)
    # The file disappears (a botched deploy): the previous policy stays too.
    errors = _count(reload_dev, INVALID)
    os.remove(reload_dev.policy_path)
    reload_dev.on_disk = None
    _wait_count(reload_dev, INVALID, errors)
    assert _refused(client, rchan, grpc.StatusCode.PERMISSION_DENIED, FOO) == FROZEN
    _issue(client, rchan, BAR)
    assert reload_dev.alive(), reload_dev.diagnostics()


def test_sighup_reloads_and_csr_sans_deny(client, reload_dev, rchan):
    _install(reload_dev, RELOAD_V2)
    # The new file keeps the old modification time, so only SIGHUP can make the server see it.
    mtime = os.stat(reload_dev.policy_path).st_mtime_ns
    reloads = _count(reload_dev, RELOADED)
    _write_atomic(reload_dev.policy_path, RELOAD_V3, mtime_ns=mtime)
    reload_dev.on_disk = RELOAD_V3
    assert os.stat(reload_dev.policy_path).st_mtime_ns == mtime
    os.kill(reload_dev.proc.pid, signal.SIGHUP)  # dev execs itself: this pid is the server
    _wait_count(reload_dev, RELOADED, reloads)
    reload_dev.in_force = RELOAD_V3
    assert reload_dev.alive(), reload_dev.diagnostics()

    # foo is no longer frozen; csr_sans = "deny" refuses SANs the rule does not produce.
    leaf, _ = _issue(client, rchan, FOO)
    assert L.san_strings(leaf) == [f"URI:{L.spiffe('foo', 'httpbin')}"]
    leaf, _ = _issue(client, rchan, FOO, dns=["httpbin.foo.svc"], uris=[L.spiffe("foo", "httpbin")])
    assert sorted(L.san_strings(leaf)) == ["DNS:httpbin.foo.svc", f"URI:{L.spiffe('foo', 'httpbin')}"]
    details = _refused(client, rchan, grpc.StatusCode.PERMISSION_DENIED, FOO, dns=["evil.example.com"])
    assert details.startswith("denied by prod-mesh: ") and "evil.example.com" in details, details
    details = _refused(client, rchan, grpc.StatusCode.PERMISSION_DENIED, FOO,
                       uris=[L.spiffe("kube-system", "admin")])
    assert details.startswith("denied by prod-mesh: ") and "kube-system" in details, details
    details = _refused(client, rchan, grpc.StatusCode.PERMISSION_DENIED, FOO, dns=["web.bar.svc"])
    assert details.startswith("denied by prod-mesh: "), details
