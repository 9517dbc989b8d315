"""SIGTERM stops `hsmca dev` gracefully: exit code 0 and nothing left serving.

(The session fixtures check the same for their servers at teardown; this test names it.)
"""

import socket

import hsmca_testlib as L


def _port_open(port):
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_exits_zero_and_stops_serving(client, kube, workdir):
    server = L.DevServer(str(workdir / "sigterm-state"), kube.kubeconfig, log_path=str(workdir / "dev-sigterm.log"))
    try:
        ch = client.channel(server.target, server.root_pem)
        _, csr = L.make_csr()
        assert len(client.create(ch, csr, token=L.GOOD_TOKEN)) == 3
        assert _port_open(server.port)
    finally:
        rc = server.stop()  # SIGTERM to the process we started; leftovers are stopped by pid
    assert not server.orphans, (
        f"after SIGTERM, `hsmca dev` (pid {server.proc.pid}) exited {rc} but left "
        f"process(es) {server.orphans} running (stopped by the suite)\n{server.diagnostics()}")
    assert rc == 0, f"exit code {rc} on SIGTERM\n{server.diagnostics()}"
    assert not _port_open(server.port), "the gRPC port still accepts connections"
