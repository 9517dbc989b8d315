"""Session fixtures for the hsmca end-to-end suite.

One fake Kubernetes API server (TokenReview) and one `hsmca dev` are started for the whole
session in temporary directories; two more `hsmca dev` instances (a trusted-node-account one
and a plaintext one) are started on first use. Every `hsmca dev` is stopped with SIGTERM at the
end and must exit 0.

Each `hsmca dev` that runs at the same time as another has its own state directory: the audit
log in DIR/audit is one hash chain, written by one server. At the end of the session the main
server's log (every request of the session, good and bad) must pass `hsmca audit verify`.
"""

import os

import pytest

import hsmca_testlib as L

GOOD_TOKEN = L.GOOD_TOKEN


def pytest_configure(config):
    if not os.path.exists(L.HSMCA):
        raise pytest.UsageError(f"{L.HSMCA} not found: run `cargo build` in {L.REPO} first")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("hsmca-e2e")


@pytest.fixture(scope="session")
def kube(workdir):
    k = L.FakeKube(str(workdir / "kube"), L.API_SERVER_TOKENS)
    yield k
    k.stop()


@pytest.fixture(scope="session")
def client(tmp_path_factory):
    out = tmp_path_factory.mktemp("proto")
    c = L.Client(*L.compile_proto(str(out)))
    yield c
    c.close()


@pytest.fixture(scope="session")
def state_dir(workdir):
    return str(workdir / "state")


def _assert_clean_exit(name, server, rc):
    """SIGTERM must stop the whole server gracefully: exit 0 and no process left serving."""
    assert rc == 0 and not server.orphans, (
        f"{name}: exit code {rc} on SIGTERM (want 0); processes still running after it "
        f"exited (stopped by the suite): {server.orphans}\n{server.diagnostics()}")


def _good_request_works(client, server):
    """One good CreateCertificate against `server`: the 'server survived' check."""
    ch = client.channel(server.target, server.root_pem)
    _, csr = L.make_csr()
    chain = client.create(ch, csr, token=GOOD_TOKEN)
    leaf = L.load_chain(chain)[0]
    assert L.san_strings(leaf) == [f"URI:{L.spiffe('foo', 'httpbin')}"]


@pytest.fixture(scope="session")
def dev(workdir, state_dir, kube, client):
    """The main `hsmca dev` (initialises the state dir on first run)."""
    server = L.DevServer(state_dir, kube.kubeconfig, log_path=str(workdir / "dev-main.log"))
    yield server
    try:
        assert server.alive(), f"hsmca dev died during the session\n{server.diagnostics()}"
        # The server survived every bad request of the session: a good one still works.
        _good_request_works(client, server)
    finally:
        rc = server.stop()
    _assert_clean_exit("hsmca dev", server, rc)
    res = L.hsmca("audit", "verify", os.path.join(state_dir, "audit"))
    assert res.returncode == 0 and res.stdout.startswith("OK: "), (
        f"the main server's audit log does not verify: exit {res.returncode}\n{res.stdout}{res.stderr}")
    # Secrets never reach the logs or the audit log: not the PIN, not a bearer token, not a key.
    with open(os.path.join(state_dir, "hsm-pin")) as f:
        pin = f.read().strip()
    texts = {"stdout": "\n".join(server.out.lines), "stderr": "\n".join(server.err.lines)}
    audit_dir = os.path.join(state_dir, "audit")
    for name in os.listdir(audit_dir):
        if name.endswith(".jsonl"):
            with open(os.path.join(audit_dir, name)) as f:
                texts[name] = f.read()
    assert len(texts["stderr"]) > 1000, "the server logged almost nothing: the secrets check would be empty"
    for where, text in texts.items():
        assert pin not in text, f"the PIN appears in {where}"
        assert "PRIVATE KEY" not in text, f"a private key appears in {where}"
        for token in L.API_SERVER_TOKENS:
            assert token not in text, f"a bearer token appears in {where}"


@pytest.fixture(scope="session")
def trusted_dev(workdir, kube, dev):
    """A second `hsmca dev` (own state dir) that trusts istio-system/ztunnel as a node agent."""
    server = L.DevServer(str(workdir / "trusted-state"), kube.kubeconfig,
                         env={"CA_TRUSTED_NODE_ACCOUNTS": "istio-system/ztunnel"},
                         log_path=str(workdir / "dev-trusted.log"))
    yield server
    rc = server.stop()
    _assert_clean_exit("trusted hsmca dev", server, rc)


@pytest.fixture(scope="session")
def plaintext_dev(workdir, kube, dev):
    """A `hsmca dev` (own state dir) that also serves plaintext gRPC (--plaintext-listen)."""
    server = L.DevServer(str(workdir / "plaintext-state"), kube.kubeconfig, plaintext=True,
                         log_path=str(workdir / "dev-plaintext.log"))
    yield server
    rc = server.stop()
    _assert_clean_exit("plaintext hsmca dev", server, rc)


@pytest.fixture
def chan(dev, client):
    """A TLS channel to the main server, trusting only DIR/root-cert.pem."""
    return client.channel(dev.target, dev.root_pem)


@pytest.fixture
def root_file(state_dir, dev):
    return os.path.join(state_dir, "root-cert.pem")

