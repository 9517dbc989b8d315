"""Authentication: bearer tokens via TokenReview, clusters, client certificates, impersonation,
plaintext, and the TokenReview cache."""

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

import hsmca_testlib as L

FOO_HTTPBIN = L.spiffe("foo", "httpbin")


def _unauthenticated(client, chan, **kw):
    _, csr = L.make_csr()
    err = L.rpc_error(client.create, chan, csr, **kw)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())
    return err


def test_missing_token_unauthenticated(client, chan):
    _unauthenticated(client, chan)


@pytest.mark.parametrize(
    "name",
    [
        "unknown",  # a JWT the API server does not know
        "wrong-audience",  # reviewed for istio-ca, but its audiences are ["other"]
        "user-alice",  # a user, not a service account
        "sa-name-without-group",  # service-account username without system:serviceaccounts
    ],
)
def test_rejected_tokens_unauthenticated(client, chan, kube, name):
    token = L.UNKNOWN_TOKEN if name == "unknown" else L.TOKEN[name]
    reviews = kube.reviews()
    _unauthenticated(client, chan, token=token)
    # The decision came from a TokenReview, not from a local shortcut.
    assert kube.reviews() == reviews + 1
    # Failures are not cached: the same token is reviewed again.
    _unauthenticated(client, chan, token=token)
    assert kube.reviews() == reviews + 2


def test_malformed_authorization_header_unauthenticated(client, chan):
    _, csr = L.make_csr()
    err = L.rpc_error(client.create, chan, csr, extra_md=[("authorization", "Basic Zm9vOmJhcg==")])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (err.code(), err.details())


def test_unknown_cluster_unauthenticated_names_it(client, chan):
    err = _unauthenticated(client, chan, token=L.GOOD_TOKEN, cluster_ids=["cluster-nobody-knows"])
    assert "cluster-nobody-knows" in (err.details() or ""), err.details()


def test_local_cluster_id_works(client, chan):
    _, csr = L.make_csr()
    chain = client.create(chan, csr, token=L.GOOD_TOKEN, cluster_ids=["Kubernetes"])
    assert L.san_strings(L.load_chain(chain)[0]) == [f"URI:{FOO_HTTPBIN}"]


def test_cluster_id_twice_unauthenticated(client, chan):
    _unauthenticated(client, chan, token=L.GOOD_TOKEN, cluster_ids=["Kubernetes", "Kubernetes"])


def test_renewal_with_client_certificate_no_token(client, chan, dev, kube):
    key = L.new_key()
    _, csr = L.make_csr(key)
    first = client.create(chan, csr, token=L.GOOD_TOKEN)
    first_leaf = L.load_chain(first)[0]

    mtls = client.channel(dev.target, dev.root_pem, key_pem=L.key_pem(key),
                          chain_pem=first[0] + first[1])
    reviews = kube.reviews()
    _, csr2 = L.make_csr()  # a workload rotates its key on renewal
    second = client.create(mtls, csr2)  # no token at all
    second_leaf = L.load_chain(second)[0]

    assert L.san_strings(second_leaf) == [f"URI:{FOO_HTTPBIN}"]
    assert second_leaf.serial_number != first_leaf.serial_number
    assert second[-1].strip() == dev.root_pem.strip()
    assert kube.reviews() == reviews, "a client-certificate renewal needs no TokenReview"


def test_client_certificate_from_another_ca_not_accepted(client, dev, tmp_path):
    """A self-signed client certificate claiming a SPIFFE ID is not an identity."""
    key = L.new_key()
    now = L.now_utc()
    name = x509.Name([])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(L.spiffe("kube-system", "admin"))]), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    ch = client.channel(dev.target, dev.root_pem, key_pem=L.key_pem(key), chain_pem=pem)
    _, csr = L.make_csr()
    err = L.rpc_error(client.create, ch, csr)
    # The TLS layer may refuse the handshake (UNAVAILABLE) or the CA may refuse the caller.
    assert err.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE), (
        err.code(), err.details())


IMPERSONATED = L.spiffe("foo", "bar")


def test_impersonation_from_untrusted_caller_refused(client, chan):
    err = _unauthenticated(client, chan, token=L.GOOD_TOKEN,
                           metadata_struct={"ImpersonatedIdentity": IMPERSONATED})
    assert "request impersonation authentication failure" in (err.details() or ""), err.details()


def test_impersonation_from_trusted_node_account(client, trusted_dev):
    ch = client.channel(trusted_dev.target, trusted_dev.root_pem)
    _, csr = L.make_csr()
    chain = client.create(ch, csr, token=L.TOKEN["ztunnel"],
                          metadata_struct={"ImpersonatedIdentity": IMPERSONATED})
    assert len(chain) == 3
    assert L.san_strings(L.load_chain(chain)[0]) == [f"URI:{IMPERSONATED}"]


def test_trusted_server_still_refuses_untrusted_impersonation(client, trusted_dev):
    ch = client.channel(trusted_dev.target, trusted_dev.root_pem)
    err = _unauthenticated(client, ch, token=L.GOOD_TOKEN,
                           metadata_struct={"ImpersonatedIdentity": IMPERSONATED})
    assert "request impersonation authentication failure" in (err.details() or ""), err.details()


def test_trusted_node_account_without_impersonation_gets_own_identity(client, trusted_dev):
    ch = client.channel(trusted_dev.target, trusted_dev.root_pem)
    _, csr = L.make_csr()
    chain = client.create(ch, csr, token=L.TOKEN["ztunnel"])
    assert L.san_strings(L.load_chain(chain)[0]) == [f"URI:{L.spiffe('istio-system', 'ztunnel')}"]


def test_plaintext_bearer_token_unauthenticated(client, plaintext_dev):
    ch = client.channel(f"127.0.0.1:{plaintext_dev.plaintext_port}", plaintext=True)
    _unauthenticated(client, ch, token=L.TOKEN["plaintext"])
    _unauthenticated(client, ch)  # and nothing else authenticates there either
    # The TLS port of the same server still serves the same token.
    tls = client.channel(plaintext_dev.target, plaintext_dev.root_pem)
    _, csr = L.make_csr()
    chain = client.create(tls, csr, token=L.TOKEN["plaintext"])
    assert L.san_strings(L.load_chain(chain)[0]) == [f"URI:{FOO_HTTPBIN}"]


def test_tokenreview_is_cached(client, chan, kube):
    before = kube.reviews()
    for _ in range(2):
        _, csr = L.make_csr()
        chain = client.create(chan, csr, token=L.TOKEN["cache-fresh"])
        assert L.san_strings(L.load_chain(chain)[0]) == [f"URI:{L.spiffe('foo', 'cached')}"]
    assert kube.reviews() - before == 1, "the same token was reviewed more than once"
