"""The Prometheus endpoint counts requests, issuances, authentication and CSR failures."""

import grpc

import hsmca_testlib as L

COUNTERS = [
    "citadel_server_csr_count",
    "citadel_server_success_cert_issuance_count",
    "citadel_server_authentication_failure_count",
    "citadel_server_csr_parsing_err_count",
]


def test_metrics_counters_increase(client, chan, dev):
    before = dev.metrics()
    for name in COUNTERS:
        assert name in before, f"{name} missing from {dev.metrics_url}"

    _, csr = L.make_csr()
    client.create(chan, csr, token=L.GOOD_TOKEN)  # one issuance
    err = L.rpc_error(client.create, chan, "garbage", token=L.GOOD_TOKEN)  # one parse error
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = L.rpc_error(client.create, chan, csr, token=L.UNKNOWN_TOKEN)  # one authn failure
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED

    after = dev.metrics()
    delta = {n: after[n] - before[n] for n in COUNTERS}
    assert delta["citadel_server_success_cert_issuance_count"] == 1, delta
    assert delta["citadel_server_csr_parsing_err_count"] == 1, delta
    assert delta["citadel_server_authentication_failure_count"] == 1, delta
    # Every CSR that reached the CA is counted: at least the issued and the unparsable one.
    assert delta["citadel_server_csr_count"] >= 2, delta
