"""Per-identity rate limiting: one noisy tenant cannot starve the HSM, the others go on, and
every refusal is audited with ResourceExhausted."""

import json
import os

import grpc
import pytest

import hsmca_testlib as L


@pytest.fixture(scope="module")
def limited(workdir, kube):
    state = str(workdir / "rate-limited-state")
    # 2 requests/s per identity, bursts of 20 (the default burst is ten times the rate).
    server = L.DevServer(state, kube.kubeconfig, extra_args=["--rate-limit", "2"],
                         log_path=str(workdir / "dev-rate-limited.log"))
    yield server
    rc = server.stop()
    assert rc == 0, f"rate-limited hsmca dev exited {rc}\n{server.diagnostics()}"


def _audit(state):
    records = []
    audit = os.path.join(state, "audit")
    for name in sorted(os.listdir(audit)):
        if name.endswith(".jsonl"):
            with open(os.path.join(audit, name)) as f:
                records += [json.loads(line) for line in f if line.strip()]
    return records


def test_noisy_identity_is_limited_and_audited_others_are_not(limited, client):
    ch = client.channel(limited.target, limited.root_pem)
    csr = L.make_csr()[1]
    codes = []
    for _ in range(40):
        try:
            client.create(ch, csr, token=L.GOOD_TOKEN)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            assert "rate limit exceeded for spiffe://cluster.local/ns/foo/sa/httpbin" in e.details()
    issued, refused = codes.count("OK"), codes.count("RESOURCE_EXHAUSTED")
    # The burst (20) plus what refilled at 2/s while the loop ran; the rest refused.
    assert 20 <= issued <= 30, codes
    assert refused == 40 - issued, codes
    # Another identity is not affected by foo/httpbin's noise.
    assert client.create(ch, L.make_csr()[1], token=L.TOKEN["bar-web"])
    records = _audit(limited.state_dir)
    limited_records = [r for r in records if r.get("status") == "ResourceExhausted"]
    assert len(limited_records) == refused
    assert all(r["kind"] == "decision" and r["decision"] == "deny" for r in limited_records)
    assert all(r["identities"] == ["spiffe://cluster.local/ns/foo/sa/httpbin"] for r in limited_records)
    signed = [r for r in records if r["kind"] == "signed" and r.get("identities") == ["spiffe://cluster.local/ns/foo/sa/httpbin"]]
    assert len(signed) == issued
