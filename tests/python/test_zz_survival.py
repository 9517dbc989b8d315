"""Runs last (file order): after every bad request of the session the server still issues."""

import hsmca_testlib as L


def test_server_survived_bad_requests(client, chan, dev, root_file, tmp_path):
    assert dev.alive(), dev.diagnostics()
    _, csr = L.make_csr()
    chain = client.create(chan, csr, token=L.GOOD_TOKEN)
    leaf = L.load_chain(chain)[0]
    assert L.san_strings(leaf) == [f"URI:{L.spiffe('foo', 'httpbin')}"]
    rc, out = L.openssl_verify(tmp_path, chain[0], chain[1], root_file)
    assert rc == 0, out
