"""Bad CSRs are refused with INVALID_ARGUMENT (and the server keeps serving)."""

import base64

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography import x509

import hsmca_testlib as L


def _valid_csr():
    return L.make_csr()[1]


def _der_as_text():
    """The CSR's DER bytes handed over as a string (each byte as one character)."""
    der = x509.load_pem_x509_csr(_valid_csr().encode()).public_bytes(serialization.Encoding.DER)
    return der.decode("latin-1")


def _der_base64_without_armor():
    der = x509.load_pem_x509_csr(_valid_csr().encode()).public_bytes(serialization.Encoding.DER)
    return base64.b64encode(der).decode()


def _rsa1024():
    return L.make_csr(L.new_key("rsa1024"))[1]


CASES = {
    "garbage": lambda: "this is not a certificate request",
    "empty": lambda: "",
    "pem-armor-garbage-body": lambda: (
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAAAAAAAAAAAAAA\n-----END CERTIFICATE REQUEST-----\n"),
    "der-bytes-as-text": _der_as_text,
    "der-base64-no-armor": _der_base64_without_armor,
    "corrupted-signature": lambda: L.corrupt_csr_signature(_valid_csr()),
    "rsa-1024": _rsa1024,
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_csr_invalid_argument(client, chan, dev, case):
    csr = CASES[case]()
    err = L.rpc_error(client.create, chan, csr, token=L.GOOD_TOKEN)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert dev.alive(), dev.diagnostics()


def test_raw_der_bytes_in_string_field(client, chan, dev):
    """DER bytes put on the wire as the `csr` field (not valid UTF-8, so not a valid proto3
    string): refused, and the server keeps running."""
    der = x509.load_pem_x509_csr(_valid_csr().encode()).public_bytes(serialization.Encoding.DER)

    wire = b"\x0a" + L.varint(len(der)) + der  # field 1 (csr), length-delimited
    call = chan.unary_unary(
        "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    err = L.rpc_error(call, wire, metadata=[("authorization", f"Bearer {L.GOOD_TOKEN}")], timeout=20)
    # A proto decoding failure is INTERNAL in gRPC servers (tonic, grpc-go); a CA that reads the
    # bytes as a CSR would say INVALID_ARGUMENT. Either way: no certificate.
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL), (
        err.code(), err.details())
    print(f"raw DER on the wire -> {err.code()}: {err.details()}")
    assert dev.alive(), dev.diagnostics()
