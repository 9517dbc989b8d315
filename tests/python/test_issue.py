"""Issuance: the done criterion, key types, SANs from the identity only, lifetimes."""

import datetime

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

import hsmca_testlib as L

FOO_HTTPBIN = L.spiffe("foo", "httpbin")


def _issue(client, chan, kind="p256", **kw):
    key = L.new_key(kind)
    _, csr = L.make_csr(key, **kw)
    chain = client.create(chan, csr, token=L.GOOD_TOKEN)
    return key, chain


def test_done_criterion_bearer_token_chain_san_verify_lint(client, chan, dev, root_file, tmp_path):
    key, chain = _issue(client, chan)

    # [leaf, intermediate, root], one PEM each, root last and equal to DIR/root-cert.pem.
    assert len(chain) == 3, chain
    leaf, inter, root = L.load_chain(chain)
    assert chain[-1].strip() == dev.root_pem.strip()
    assert root == x509.load_pem_x509_certificate(dev.root_pem.encode())
    assert inter == x509.load_pem_x509_certificate(dev.intermediate_pem.encode())
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()

    # Exactly the SPIFFE ID of the authenticated service account, as a critical SAN.
    assert L.san_strings(leaf) == [f"URI:{FOO_HTTPBIN}"]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical, "SAN must be critical when the subject is empty"
    assert len(leaf.subject) == 0, leaf.subject
    assert leaf.issuer == inter.subject

    rc, out = L.openssl_verify(tmp_path, chain[0], chain[1], root_file)
    assert rc == 0, out
    assert "OK" in out

    assert L.pkilint_errors(tmp_path, chain[0]) == []


@pytest.mark.parametrize("kind", ["p256", "rsa2048"])
def test_key_types_key_usage_verify_lint(client, chan, root_file, tmp_path, kind):
    key, chain = _issue(client, chan, kind)
    leaf = L.load_chain(chain)[0]
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    if kind == "p256":
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    else:
        assert isinstance(leaf.public_key(), rsa.RSAPublicKey)
        assert leaf.public_key().key_size == 2048

    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert ku.value.key_encipherment is (kind == "rsa2048")
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert not ku.value.content_commitment and not ku.value.data_encipherment
    assert not ku.value.key_agreement

    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert set(eku.value) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}

    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca is False

    assert L.san_strings(leaf) == [f"URI:{FOO_HTTPBIN}"]
    for purpose in (None, "sslclient", "sslserver"):
        rc, out = L.openssl_verify(tmp_path, chain[0], chain[1], root_file, purpose=purpose)
        assert rc == 0, f"purpose {purpose}: {out}"
    assert L.pkilint_errors(tmp_path, chain[0]) == []


def test_csr_sans_are_ignored(client, chan):
    _, chain = _issue(
        client, chan,
        dns=["evil.com"],
        uris=[L.spiffe("kube-system", "admin")],
    )
    leaf = L.load_chain(chain)[0]
    assert L.san_strings(leaf) == [f"URI:{FOO_HTTPBIN}"]


def test_csr_common_name_kept_only_as_subject(client, chan):
    """A CSR CN may end up in the subject, but never becomes a SAN."""
    _, chain = _issue(client, chan, cn="evil.com")
    leaf = L.load_chain(chain)[0]
    assert L.san_strings(leaf) == [f"URI:{FOO_HTTPBIN}"]


SKEW = datetime.timedelta(seconds=120)
TOLERANCE = datetime.timedelta(seconds=5)


def _lifetime_of(client, chan, validity):
    _, csr = L.make_csr()
    before = L.now_utc()
    chain = client.create(chan, csr, token=L.GOOD_TOKEN, validity=validity)
    after = L.now_utc()
    leaf = L.load_chain(chain)[0]
    # notBefore is backdated two minutes for clock skew (second precision in X.509).
    assert before - SKEW - TOLERANCE <= leaf.not_valid_before_utc <= after - SKEW + TOLERANCE, (
        leaf.not_valid_before_utc, before, after)
    return L.lifetime(leaf)


@pytest.mark.parametrize(
    "validity,expected",
    [
        (0, datetime.timedelta(hours=24)),  # no lifetime asked: DEFAULT_WORKLOAD_CERT_TTL 24h
        (3600, datetime.timedelta(hours=1)),
        (90 * 86400, datetime.timedelta(days=90)),  # exactly MAX_WORKLOAD_CERT_TTL is allowed
    ],
    ids=["default-24h", "3600s", "exactly-90d"],
)
def test_lifetime(client, chan, validity, expected):
    got = _lifetime_of(client, chan, validity)
    assert abs(got - (expected + SKEW)) <= TOLERANCE, f"lifetime {got}, expected {expected} + 120 s"


def test_lifetime_above_max_is_invalid_argument(client, chan):
    _, csr = L.make_csr()
    err = L.rpc_error(client.create, chan, csr, token=L.GOOD_TOKEN, validity=91 * 86400)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
