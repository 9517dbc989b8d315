"""The audit log (DIR/audit/audit-NNNNNN.jsonl): what is recorded, `hsmca audit verify` and
`hsmca audit show`, tamper detection on copies of a real log, a crash (kill -9) under load and
torn-line recovery.

Every server here has its own state directory: one audit log is one hash chain.
"""

import base64
import concurrent.futures
import datetime
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

import hsmca_testlib as L

POLICY = """\
version = 1
trust_domain = "cluster.local"

[defaults]
lifetime = "24h"
max_lifetime = "48h"
key_types = ["ecdsa-p256", "rsa-2048"]

[[deny]]
name = "no-kube-system"
namespaces = ["kube-system"]
reason = "workloads in kube-system get no mesh identity"

[[rule]]
name = "payments"
authenticators = ["kube-jwt"]
namespaces = ["payments"]
uri_sans = ["spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"]
dns_sans = ["{service_account}.{namespace}.svc"]
max_lifetime = "1h"

[[rule]]
name = "mesh"
authenticators = ["kube-jwt", "client-cert"]
namespaces = ["foo", "bar"]
uri_sans = ["spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"]
dns_sans = ["{service_account}.{namespace}.svc"]
"""

STATUS_NAME = {
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

FAILED_RX = re.compile(r"^FAILED: (?P<file>.+?):(?P<line>\d+): (?:record (?P<seq>\d+): )?(?P<what>.*)$", re.M)


# --------------------------------------------------------------------------------------------
# Helpers


def _stop_clean(name, server):
    rc = server.stop()
    assert rc == 0 and not server.orphans, (
        f"{name}: exit code {rc} on SIGTERM (want 0), leftover processes {server.orphans}\n"
        f"{server.diagnostics()}")


def _lines(audit_dir):
    """Every line of the log (files in order), without newlines."""
    out = []
    for f in sorted(glob.glob(os.path.join(audit_dir, "audit-*.jsonl"))):
        data = L.read(f, "rb")
        out += [(f, i + 1, line) for i, line in enumerate(data.split(b"\n")) if line]
    return out


def _records(audit_dir):
    return [json.loads(line) for _, _, line in _lines(audit_dir)]


def _serial_hex(cert):
    return format(cert.serial_number, "x")


def _norm_serial(s):
    return s.lower().replace(":", "").lstrip("0")


def _verify(path, *extra, key=None):
    args = ["audit", "verify", str(path), *extra]
    if key:
        args += ["--key", str(key)]
    res = L.hsmca(*args)
    return res.returncode, res.stdout + res.stderr


def _show(audit_dir, *filters):
    """`hsmca audit show --json` -> (exit code, records)."""
    res = L.hsmca("audit", "show", str(audit_dir), *filters, "--json")
    assert res.returncode in (0, 2), (res.returncode, res.stdout, res.stderr)
    return res.returncode, [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def _rfc3339(s):
    # Python before 3.11 does not take nanoseconds or Z: cut to microseconds.
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z$", s)
    assert m, s
    frac = (m.group(2) or ".0")[:7]
    return datetime.datetime.strptime(m.group(1) + frac, "%Y-%m-%dT%H:%M:%S.%f").replace(
        tzinfo=datetime.timezone.utc)


# --------------------------------------------------------------------------------------------
# One server's life: issued and refused requests, a burst, then SIGTERM


@pytest.fixture(scope="module")
def audited(workdir, kube, client):
    state = str(workdir / "audit-state")
    policy = workdir / "audit-policy.toml"
    policy.write_text(POLICY)
    server = L.DevServer(state, kube.kubeconfig, extra_args=["--policy", str(policy)],
                         log_path=str(workdir / "dev-audit.log"))
    ch = client.channel(server.target, server.root_pem)
    issued, denied = [], []
    try:
        for token, kind, dns, rule in [
            (L.GOOD_TOKEN, "p256", [], "mesh"),
            (L.GOOD_TOKEN, "p256", ["httpbin.foo.svc"], "mesh"),
            (L.GOOD_TOKEN, "rsa2048", [], "mesh"),
            (L.TOKEN["bar-web"], "p256", [], "mesh"),
            (L.TOKEN["payments-checkout"], "p256", ["checkout.payments.svc"], "payments"),
        ]:
            _, csr = L.make_csr(L.new_key(kind), dns=dns)
            chain = client.create(ch, csr, token=token)
            leaf = L.load_chain(chain)[0]
            issued.append({"leaf": leaf, "rule": rule, "token": token})

        def refuse(code, rule=None, identity=None, token=None, validity=0, csr=None):
            csr = csr or L.make_csr()[1]
            err = L.rpc_error(client.create, ch, csr, token=token, validity=validity)
            assert err.code() == code, (err.code(), err.details())
            denied.append({"code": code, "details": err.details(), "rule": rule, "identity": identity,
                           "token": token})

        refuse(grpc.StatusCode.PERMISSION_DENIED, "no-kube-system", L.spiffe("kube-system", "coredns"),
               L.TOKEN["kube-system-coredns"])
        refuse(grpc.StatusCode.PERMISSION_DENIED, "payments", L.spiffe("payments", "checkout"),
               L.TOKEN["payments-checkout"], validity=7200)
        refuse(grpc.StatusCode.INVALID_ARGUMENT, "defaults.max_lifetime", L.spiffe("foo", "httpbin"),
               L.GOOD_TOKEN, validity=49 * 3600)
        refuse(grpc.StatusCode.INVALID_ARGUMENT, None, L.spiffe("foo", "httpbin"), L.GOOD_TOKEN,
               csr="-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS\n-----END CERTIFICATE REQUEST-----\n")
        refuse(grpc.StatusCode.UNAUTHENTICATED, None, None, L.UNKNOWN_TOKEN)
        refuse(grpc.StatusCode.UNAUTHENTICATED)

        # A burst of quick refusals (no credentials): more than 64 records within 2 s.
        _, csr = L.make_csr()

        def anonymous(_):
            try:
                client.create(ch, csr)
            except grpc.RpcError as e:
                return e.code()
            return "issued"

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(anonymous, range(200)))
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}, set(codes)

        assert L.pkilint_errors_many([i["leaf"].public_bytes(serialization.Encoding.PEM) for i in issued]) == {}

        # Idle for longer than the checkpoint interval: the tail gets sealed while running.
        time.sleep(3.5)
        running_snapshot = _lines(os.path.join(state, "audit"))
    finally:
        _stop_clean("audit hsmca dev", server)
    return {
        "state": state,
        "audit": os.path.join(state, "audit"),
        "key": os.path.join(state, "audit-key.pem"),
        "issued": issued,
        "denied": denied,
        "running_snapshot": running_snapshot,
        "server_log": server.diagnostics(),
    }


def test_verify_intact_log(audited):
    rc, out = _verify(audited["audit"])
    assert rc == 0, out
    lines = _lines(audited["audit"])
    records = [json.loads(line) for _, _, line in lines]
    m = re.match(r"OK: (\d+) records, (\d+) checkpoints verified", out)
    assert m and int(m.group(1)) == len(records), out
    assert int(m.group(2)) == sum(1 for r in records if r["kind"] == "checkpoint") >= 4, out
    assert [r["seq"] for r in records] == list(range(len(records)))
    # The log begins with init's ceremony (keys generated, root and intermediate signed, then
    # init's stop and seal), and the server's run follows with its start record.
    assert records[0]["kind"] == "ceremony" and records[0]["prev"] == "0" * 64
    assert [r["kind"] for r in records].count("ceremony") == 5
    assert any(r["kind"] == "start" for r in records)
    # SIGTERM: a stop record, then a final checkpoint sealing it.
    assert [r["kind"] for r in records[-2:]] == ["stop", "checkpoint"], records[-2:]
    assert all(r["v"] == 1 for r in records)
    # One file can be verified on its own (the key is found next to its directory).
    rc, out = _verify(lines[0][0])
    assert rc == 0 and out.startswith("OK: "), out
    # The audit key is a public key, published next to the log.
    serialization.load_pem_public_key(L.read(audited["key"], "rb"))


def test_checkpoints_every_64_records_or_2_seconds(audited):
    kinds = [json.loads(line)["kind"] for _, _, line in _lines(audited["audit"])]
    runs, run = [], 0
    for k in kinds:
        if k == "checkpoint":
            runs.append(run)
            run = 0
        else:
            run += 1
    assert max(runs) <= 64, f"{max(runs)} records without a checkpoint"
    assert 64 in runs, f"the burst of 200 refusals never hit the 64-record seal: {runs}"
    # 3.5 s after the last request, with the server still running, the tail was sealed.
    last = json.loads(audited["running_snapshot"][-1][2])
    assert last["kind"] == "checkpoint", last


def test_every_issued_serial_has_a_signed_record(audited):
    for item in audited["issued"]:
        leaf = item["leaf"]
        serial = _serial_hex(leaf)
        rc, records = _show(audited["audit"], "--serial", serial)
        assert rc == 0, f"serial {serial} not found"
        kinds = [r["kind"] for r in records]
        assert kinds == ["signing", "signed"], kinds
        signing, signed = records
        assert signing["request_id"] == signed["request_id"]
        assert _norm_serial(signed["serial"]) == _norm_serial(serial)
        assert signed["decision"] == "allow"
        assert signed["policy_rule"] == item["rule"]
        assert signed["authenticator"] == "kube-jwt"
        assert sorted(signed["sans"]) == sorted(s.split(":", 1)[1] for s in L.san_strings(leaf))
        assert signed["identities"] == [s.split(":", 1)[1] for s in L.san_strings(leaf) if s.startswith("URI:")]
        der = leaf.public_bytes(serialization.Encoding.DER)
        assert signed["cert_sha256"] == hashlib.sha256(der).hexdigest()
        assert signed["token_sha256"] == hashlib.sha256(item["token"].encode()).hexdigest()
        assert abs(_rfc3339(signed["not_after"]) - leaf.not_valid_after_utc) < datetime.timedelta(seconds=1)
        assert abs(_rfc3339(signed["not_before"]) - leaf.not_valid_before_utc) < datetime.timedelta(seconds=1)

    # The serial may be given as openssl prints it: colon-separated, upper case, leading zero.
    leaf = audited["issued"][0]["leaf"]
    raw = leaf.serial_number.to_bytes((leaf.serial_number.bit_length() + 8) // 8, "big")
    rc, records = _show(audited["audit"], "--serial", ":".join(f"{b:02X}" for b in raw))
    assert rc == 0 and [r["kind"] for r in records] == ["signing", "signed"], records
    # The table output names the serial too.
    res = L.hsmca("audit", "show", audited["audit"], "--serial", _serial_hex(leaf))
    assert res.returncode == 0 and "signed" in res.stdout, res.stdout
    assert _norm_serial(_serial_hex(leaf)) in res.stdout.replace(":", "").lower(), res.stdout


def test_denied_requests_listed_with_reason(audited):
    rc, records = _show(audited["audit"], "--decision", "deny")
    assert rc == 0
    assert all(r["kind"] == "decision" and r["decision"] == "deny" for r in records)
    for d in audited["denied"]:
        matching = [r for r in records if r.get("reason") == d["details"]]
        assert matching, f"no deny record with reason {d['details']!r}"
        r = matching[0]
        assert r["status"] == STATUS_NAME[d["code"]], r
        assert r.get("policy_rule") == d["rule"], r
        if d["identity"]:
            assert r["identities"] == [d["identity"]], r
        if d["token"]:
            assert r["token_sha256"] == hashlib.sha256(d["token"].encode()).hexdigest(), r
        assert "serial" not in r, r
    # 6 refusals plus the burst of 200 anonymous ones.
    assert len(records) == len(audited["denied"]) + 200

    # By identity: only the kube-system refusal; the table names the rule and the reason.
    coredns = L.spiffe("kube-system", "coredns")
    rc, records = _show(audited["audit"], "--identity", coredns)
    assert rc == 0 and len(records) == 1 and records[0]["policy_rule"] == "no-kube-system", records
    res = L.hsmca("audit", "show", audited["audit"], "--identity", coredns, "--decision", "deny")
    assert res.returncode == 0, res.stdout + res.stderr
    row = [line for line in res.stdout.splitlines() if coredns in line]
    assert len(row) == 1 and "no-kube-system" in row[0], res.stdout
    assert "workloads in kube-system get no mesh identity" in row[0], res.stdout


def test_show_filters_and_no_match_exit_2(audited):
    audit = audited["audit"]
    rc, _ = _show(audit, "--serial", "deadbeefdeadbeef")
    assert rc == 2
    rc, _ = _show(audit, "--identity", L.spiffe("nobody", "nothing"))
    assert rc == 2
    rc, _ = _show(audit, "--since", "2999-01-01T00:00:00Z")
    assert rc == 2
    rc, records = _show(audit, "--since", "2000-01-01T00:00:00Z")
    assert rc == 0 and len(records) == len(_lines(audit))
    res = L.hsmca("audit", "show", audit, "--since", "yesterday")
    assert res.returncode == 1 and "RFC 3339" in res.stderr, res.stderr


def test_log_holds_no_token(audited):
    text = b"".join(line for _, _, line in _lines(audited["audit"]))
    for name, token in L.TOKEN.items():
        assert token.encode() not in text, f"token {name} is in the audit log"
    assert L.UNKNOWN_TOKEN.encode() not in text


# --------------------------------------------------------------------------------------------
# Tampering, on copies of the log


def _copy(audited, tmp_path):
    dest = tmp_path / "audit"
    shutil.copytree(audited["audit"], dest)
    shutil.copy(audited["key"], tmp_path / "audit-key.pem")
    files = sorted(glob.glob(str(dest / "audit-*.jsonl")))
    assert len(files) == 1, files
    path = files[0]
    return dest, path, L.read(path, "rb").split(b"\n")[:-1]


def _write_lines(path, lines, trailing_newline=True):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + (b"\n" if trailing_newline else b""))


def _middle_record(lines, need_next_plain=False):
    """Index of a non-checkpoint request record in the middle of the log."""
    n = len(lines)
    for i in list(range(n // 2, n - 3)) + list(range(1, n // 2)):
        rec = json.loads(lines[i])
        nxt = json.loads(lines[i + 1])
        if rec["kind"] != "checkpoint" and "request_id" in rec and (
                not need_next_plain or nxt["kind"] != "checkpoint"):
            return i
    raise AssertionError("no record to tamper with")


def _failure(rc, out):
    assert rc == 1, f"verify exit {rc} on a tampered log\n{out}"
    m = FAILED_RX.search(out)
    assert m, out
    return m.group("file"), int(m.group("line")), m.group("seq") and int(m.group("seq")), m.group("what")


def test_tamper_edit_one_byte(audited, tmp_path):
    dest, path, lines = _copy(audited, tmp_path)
    i = _middle_record(lines)
    line = lines[i]
    at = line.index(b'"request_id":"') + len(b'"request_id":"') + 3
    old = line[at:at + 1]
    new = b"a" if old != b"a" else b"b"
    edited = line[:at] + new + line[at + 1:]
    assert json.loads(edited)["request_id"] != json.loads(line)["request_id"]  # still a record
    lines[i] = edited
    _write_lines(path, lines)
    f, lno, seq, what = _failure(*_verify(dest))
    assert f == path, f
    assert lno in (i + 1, i + 2), f"edited line {i + 1}, verify names line {lno}: {what}"
    assert seq == json.loads(lines[lno - 1])["seq"], (seq, lno)
    assert "hash link broken" in what, what


def test_tamper_edit_and_rechain_is_caught_by_checkpoint(audited, tmp_path):
    """An editor without the audit key can fix every hash link after the edit, not the checkpoint."""
    dest, path, lines = _copy(audited, tmp_path)
    i = _middle_record(lines)
    rec = json.loads(lines[i])
    lines[i] = lines[i].replace(rec["request_id"].encode(), b"0" * len(rec["request_id"]))
    for j in range(i + 1, len(lines)):
        old_prev = json.loads(lines[j])["prev"].encode()
        lines[j] = lines[j].replace(b'"prev":"' + old_prev, b'"prev":"' + hashlib.sha256(lines[j - 1]).hexdigest().encode())
    _write_lines(path, lines)
    first_cp = next(j for j in range(i + 1, len(lines)) if json.loads(lines[j])["kind"] == "checkpoint")
    f, lno, seq, what = _failure(*_verify(dest))
    assert lno == first_cp + 1, f"first checkpoint after the edit is line {first_cp + 1}, verify names {lno}: {what}"
    assert seq == json.loads(lines[first_cp])["seq"]
    assert "signature does not verify" in what, what


def test_tamper_delete_record(audited, tmp_path):
    dest, path, lines = _copy(audited, tmp_path)
    i = _middle_record(lines)
    gone = json.loads(lines[i])["seq"]
    del lines[i]
    _write_lines(path, lines)
    f, lno, seq, what = _failure(*_verify(dest))
    assert (lno, seq) == (i + 1, gone + 1), (lno, seq, what)
    assert f"expected record {gone}" in what and "missing" in what, what


def test_tamper_swap_records(audited, tmp_path):
    dest, path, lines = _copy(audited, tmp_path)
    i = _middle_record(lines, need_next_plain=True)
    first = json.loads(lines[i])["seq"]
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    _write_lines(path, lines)
    f, lno, seq, what = _failure(*_verify(dest))
    assert (lno, seq) == (i + 1, first + 1), (lno, seq, what)
    assert f"expected record {first}" in what, what


@pytest.mark.parametrize("which", ["middle", "last"])
def test_tamper_checkpoint_signature(audited, tmp_path, which):
    dest, path, lines = _copy(audited, tmp_path)
    cps = [j for j, line in enumerate(lines) if json.loads(line)["kind"] == "checkpoint"]
    assert len(cps) >= 3 and cps[-1] == len(lines) - 1
    i = cps[len(cps) // 2] if which == "middle" else cps[-1]
    rec = json.loads(lines[i])
    sig = rec["sig"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    pos = len(sig) // 2
    bad = sig[:pos] + alphabet[(alphabet.index(sig[pos]) + 1) % 64] + sig[pos + 1:]
    assert base64.b64decode(bad, validate=True) != base64.b64decode(sig)  # still valid base64
    lines[i] = lines[i].replace(sig.encode(), bad.encode())
    _write_lines(path, lines)
    f, lno, seq, what = _failure(*_verify(dest))
    assert (lno, seq) == (i + 1, rec["seq"]), (lno, seq, what)
    assert "signature does not verify" in what, what


def test_tamper_truncate_mid_line(audited, tmp_path):
    dest, path, lines = _copy(audited, tmp_path)
    i = _middle_record(lines)
    cut = lines[:i] + [lines[i][: len(lines[i]) // 2]]
    _write_lines(path, cut, trailing_newline=False)
    f, lno, seq, what = _failure(*_verify(dest))
    assert lno == i + 1 and seq is None, (lno, seq, what)
    assert "middle of a line" in what, what


def test_unsealed_tail_is_bounded(audited, tmp_path):
    """Without its final checkpoint the log verifies only while the unsealed tail is tolerated."""
    dest, path, lines = _copy(audited, tmp_path)
    assert json.loads(lines[-1])["kind"] == "checkpoint"
    _write_lines(path, lines[:-1])
    rc, out = _verify(dest)
    assert rc == 0 and "1 unsealed at the end" in out, out
    f, lno, seq, what = _failure(*_verify(dest, "--max-unsealed", "0"))
    assert (lno, seq) == (len(lines) - 1, json.loads(lines[-2])["seq"]), (lno, seq, what)
    assert "unsealed" in what, what


def test_verify_with_another_key_fails(audited, tmp_path, workdir):
    """A log checked against some other audit key is not vouched for."""
    other = str(workdir / "other-key-state")
    res = L.hsmca("init", "--state-dir", other)
    assert res.returncode == 0, res.stdout + res.stderr
    f, lno, seq, what = _failure(*_verify(audited["audit"], key=os.path.join(other, "audit-key.pem")))
    assert "another key" in what, what


# --------------------------------------------------------------------------------------------
# Crash and recovery


def test_kill_9_under_load_then_recover(workdir, kube, client, tmp_path):
    state = str(workdir / "crash-state")
    audit = os.path.join(state, "audit")
    server = L.DevServer(state, kube.kubeconfig, log_path=str(workdir / "dev-crash-1.log"))
    ch = client.channel(server.target, server.root_pem)
    received, failures, leaves = [], [], []
    lock = threading.Lock()
    stop = threading.Event()

    def worker():
        while not stop.is_set():
            _, csr = L.make_csr()
            try:
                chain = client.create(ch, csr, token=L.GOOD_TOKEN, timeout=10)
            except grpc.RpcError as e:
                with lock:
                    failures.append(e.code())
                continue
            leaf = L.load_chain(chain)[0]
            with lock:
                received.append(_serial_hex(leaf))
                leaves.append(chain[0])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(worker) for _ in range(8)]
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with lock:
                    if len(received) >= 80:
                        break
                time.sleep(0.01)
            os.kill(server.proc.pid, signal.SIGKILL)  # dev execs itself: this pid is the server
            server.proc.wait(10)
            time.sleep(0.5)  # requests in flight at the kill fail now
        finally:
            stop.set()
        for w in workers:
            w.result()
    server.stop()  # collects the output; the process is gone
    assert server.proc.returncode == -signal.SIGKILL
    assert len(received) >= 80, (len(received), failures[:5])
    assert L.pkilint_errors_many(leaves) == {}

    log_file = sorted(glob.glob(os.path.join(audit, "audit-*.jsonl")))[-1]
    raw = L.read(log_file, "rb")
    torn = raw[raw.rfind(b"\n") + 1:]
    if not torn:
        # As the crash left it: intact, with an unsealed tail (no stop record, no final checkpoint).
        crashed = tmp_path / "crashed"
        shutil.copytree(audit, crashed / "audit")
        shutil.copy(os.path.join(state, "audit-key.pem"), crashed / "audit-key.pem")
        rc, out = _verify(crashed / "audit", "--max-unsealed", "100000")
        assert rc == 0, out

    # Restart on the same state dir: recovers, serves, stops cleanly.
    server = L.DevServer(state, kube.kubeconfig, log_path=str(workdir / "dev-crash-2.log"))
    try:
        chain = client.create(client.channel(server.target, server.root_pem), L.make_csr()[1], token=L.GOOD_TOKEN)
        received.append(_serial_hex(L.load_chain(chain)[0]))
    finally:
        _stop_clean("restarted hsmca dev", server)

    kept = glob.glob(os.path.join(audit, "torn-*.bin"))
    records = _records(audit)
    recovered = [r for r in records if r["kind"] == "recovered"]
    if torn:
        assert len(kept) == 1 and L.read(kept[0], "rb") == torn, kept
        assert len(recovered) == 1 and hashlib.sha256(torn).hexdigest() in recovered[0]["torn"], recovered
    else:
        assert kept == [] and recovered == [], (kept, recovered)

    rc, out = _verify(audit, "--max-unsealed", "100000")
    assert rc == 0, out
    kinds = [r["kind"] for r in records]
    # init's ceremony ends with a stop; then one start per server run and one clean stop.
    assert kinds.count("start") == 2 and kinds.count("stop") == 2, "one start per run, one clean stop"
    signed = {_norm_serial(r["serial"]): r for r in records if r["kind"] == "signed"}
    signing = {(r["request_id"], _norm_serial(r["serial"])) for r in records if r["kind"] == "signing"}
    missing = [s for s in received if _norm_serial(s) not in signed]
    assert missing == [], f"{len(missing)} of {len(received)} serials clients received have no signed record"
    # Every signature was announced (a signing record) before the HSM was asked.
    for s, r in signed.items():
        assert (r["request_id"], s) in signing, r
    # Spot check through the CLI.
    for s in received[:3] + received[-3:]:
        rc, recs = _show(audit, "--serial", s)
        assert rc == 0 and "signed" in [r["kind"] for r in recs], (s, recs)


def test_torn_last_line_is_kept_aside_and_recorded(workdir, kube, client):
    state = str(workdir / "torn-state")
    audit = os.path.join(state, "audit")
    server = L.DevServer(state, kube.kubeconfig, log_path=str(workdir / "dev-torn-1.log"))
    try:
        client.create(client.channel(server.target, server.root_pem), L.make_csr()[1], token=L.GOOD_TOKEN)
    finally:
        _stop_clean("hsmca dev", server)
    log_file = sorted(glob.glob(os.path.join(audit, "audit-*.jsonl")))[-1]
    intact = L.read(log_file, "rb")
    fragment = b'{"v":1,"seq":' + str(len(intact.splitlines())).encode() + b',"time":"2026-01-01T00:00'
    with open(log_file, "ab") as f:
        f.write(fragment)
    f_, lno, seq, what = _failure(*_verify(audit))
    assert lno == len(intact.splitlines()) + 1 and "middle of a line" in what, what

    server = L.DevServer(state, kube.kubeconfig, log_path=str(workdir / "dev-torn-2.log"))
    _stop_clean("restarted hsmca dev", server)

    kept = glob.glob(os.path.join(audit, "torn-*.bin"))
    assert len(kept) == 1 and L.read(kept[0], "rb") == fragment, kept
    after = L.read(log_file, "rb")
    assert after.startswith(intact), "the complete records before the torn line were changed"
    new = [json.loads(line) for line in after[len(intact):].splitlines()]
    assert new[0]["kind"] == "recovered", new[0]
    assert hashlib.sha256(fragment).hexdigest() in new[0]["torn"] and os.path.basename(kept[0]) in new[0]["torn"]
    assert new[0]["prev"] == hashlib.sha256(intact.splitlines()[-1]).hexdigest()
    rc, out = _verify(audit)
    assert rc == 0, out


def test_second_server_on_same_state_dir_does_not_corrupt_log(workdir, kube, client):
    # One CA writes one audit log: a second server on the same state dir must refuse to start
    # (it cannot take DIR/audit/.lock) rather than interleave a second hash chain.
    state = str(workdir / "shared-state")
    first = L.DevServer(state, kube.kubeconfig, log_path=str(workdir / "dev-shared-1.log"))
    second = None
    try:
        with pytest.raises(RuntimeError) as refused:
            second = L.DevServer(state, kube.kubeconfig, log_path=str(workdir / "dev-shared-2.log"),
                                 startup_timeout=30)
        assert "in use by another hsmca process" in str(refused.value), refused.value
        for _ in range(3):
            client.create(client.channel(first.target, first.root_pem), L.make_csr()[1], token=L.GOOD_TOKEN)
    finally:
        if second:
            _stop_clean("second hsmca dev", second)
        _stop_clean("first hsmca dev", first)
    rc, out = _verify(os.path.join(state, "audit"))
    assert rc == 0, out
