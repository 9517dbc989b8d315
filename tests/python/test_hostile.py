"""Hostile input, table-driven, through the real gRPC server.

One `hsmca dev` (its own state directory, its own fake Kubernetes API server with a token table
of its own, a TLS listener and a `--plaintext-listen` one, CA_TRUSTED_NODE_ACCOUNTS unset, so
nobody may impersonate) receives every row of REFUSED, one at a time. For each row:

  1. the gRPC status code is the expected one (and the message holds a stable substring);
  2. nothing was signed: no new `signing`, `signed` or `failed` record in DIR/audit;
  3. the refusal was audited: exactly one new `decision` record, `decision: deny`, whose
     `status` is the code's name and whose `reason` is the message the caller got,

except for rows the transport rejects before the service runs (`audited=False`, each saying
why): for those the client error is checked and the log must show no new record at all (the
writer's `checkpoint` records, which it may add at any time, are ignored everywhere).

ACCEPTED holds the hostile requests a CA must *answer*, Istio-style, by ignoring what the
caller asked for: the leaf is issued, but it is CA:false and carries only the caller's SPIFFE ID.
Then 200 concurrent CreateCertificate calls share one channel; at the end the server must still
serve, stop on SIGTERM with exit 0, and `hsmca audit verify` must accept its log.
"""

import base64
import datetime
import glob
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Optional

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import hsmca_testlib as L

IA = grpc.StatusCode.INVALID_ARGUMENT
UA = grpc.StatusCode.UNAUTHENTICATED
STATUS_NAME = {
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.INTERNAL: "Internal",
}

GOOD = L.GOOD_TOKEN  # foo/httpbin, audience istio-ca
FOO_HTTPBIN = L.spiffe("foo", "httpbin")
DAY = 86400
I64_MAX = 2**63 - 1
I64_MIN = -(2**63)
METHOD = "/istio.v1.auth.IstioCertificateService/CreateCertificate"


# --------------------------------------------------------------------------------------------
# Tokens: this module's fake API server knows the suite's table plus these entries.


def _sa_user(name, username, groups=None):
    groups = ["system:serviceaccounts", "system:serviceaccounts:foo", "system:authenticated"] \
        if groups is None else groups
    token = L.fake_jwt(name, username, ["istio-ca"])
    return token, {"username": username, "groups": groups, "audiences": ["istio-ca"], "extra": {}}


_EXTRA = {
    # The API server authenticates it, but the username has five parts, not four.
    "too-many-colons": _sa_user("too-many-colons", "system:serviceaccount:foo:httpbin:extra"),
    # ... and here the namespace is empty.
    "empty-namespace": _sa_user("empty-namespace", "system:serviceaccount::httpbin"),
    # A node, authenticated, in the service-account group (a confused API server), not an SA.
    "node-user": _sa_user("node-user", "system:node:worker-1"),
}
TOKENS = dict(L.API_SERVER_TOKENS)
TOKENS.update({tok: entry for tok, entry in _EXTRA.values()})
TOK = {name: tok for name, (tok, _) in _EXTRA.items()}

# Tokens deliberately NOT in the table: the API server decides, and it says no. A real
# kube-apiserver answers `authenticated: false` with an error for an expired token or one from
# another issuer exactly as the fake one does for a token it does not know, so these reach the
# same code path in hsmca as any token the API server refuses.
EXPIRED_TOKEN = L.fake_jwt("expired", "system:serviceaccount:foo:httpbin", ["istio-ca"], lifetime=-3600)


def _wrong_issuer_jwt():
    """A JWT-shaped token whose `iss` is some other issuer (unknown to the API server)."""
    def b64(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    now = int(time.time())
    claims = {"iss": "https://evil.example.com", "sub": "system:serviceaccount:foo:httpbin",
              "aud": ["istio-ca"], "iat": now, "nbf": now, "exp": now + 3600, "jti": "wrong-issuer"}
    return f"{b64({'alg': 'RS256', 'kid': 'evil'})}.{b64(claims)}.c2ln"


WRONG_ISSUER_TOKEN = _wrong_issuer_jwt()
assert EXPIRED_TOKEN not in TOKENS and WRONG_ISSUER_TOKEN not in TOKENS


# --------------------------------------------------------------------------------------------
# DER surgery on signed X.509 structures (CertificationRequest and Certificate share the shape
# SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING }).


def _read_tlv(buf, i):
    """(tag, content start, content end) of the DER element at `i`."""
    tag = buf[i]
    n = buf[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        n = int.from_bytes(buf[i:i + k], "big")
        i += k
    return tag, i, i + n


def _der_len(n):
    if n < 0x80:
        return bytes([n])
    b = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(b)]) + b


def _tlv(tag, content):
    return bytes([tag]) + _der_len(len(content)) + content


def _split_signed(der):
    """(tbs element, algorithm element, signature bytes) of a signed structure."""
    tag, start, end = _read_tlv(der, 0)
    assert tag == 0x30
    items, i = [], start
    while i < end:
        _, _, e = _read_tlv(der, i)
        items.append(der[i:e])
        i = e
    tbs, alg, bits = items
    _, s, _ = _read_tlv(bits, 0)
    return tbs, alg, bits[s + 1:]


def _join_signed(tbs, alg, sig, unused_bits=0):
    return _tlv(0x30, tbs + alg + _tlv(0x03, bytes([unused_bits]) + sig))


ALG_SHA1_RSA = bytes.fromhex("300d06092a864886f70d0101050500")
ALG_SHA256_RSA = bytes.fromhex("300d06092a864886f70d01010b0500")
ALG_ECDSA_SHA1 = bytes.fromhex("300906072a8648ce3d0401")


def _pem(der, label="CERTIFICATE REQUEST"):
    b64 = base64.b64encode(der).decode()
    body = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN {label}-----\n{body}\n-----END {label}-----\n"


# --------------------------------------------------------------------------------------------
# CSR builders


def _csr_der(key=None, hash_alg=hashes.SHA256(), cn=None, exts=(), **sign_kw):
    key = key or L.new_key()
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    for ext, critical in exts:
        b = b.add_extension(ext, critical=critical)
    return b.sign(key, hash_alg, **sign_kw).public_bytes(serialization.Encoding.DER)


def _csr(key=None, **kw):
    return _pem(_csr_der(key, **kw))


def _good_csr():
    return L.make_csr()[1]


def _sig_over_other_bytes():
    """The CSR's own key signed *another* CSR's info; that signature is spliced in."""
    key = L.new_key()
    tbs, alg, _ = _split_signed(_csr_der(key, cn="the-info-that-is-sent"))
    _, _, other_sig = _split_signed(_csr_der(key, cn="the-info-that-was-signed"))
    return _pem(_join_signed(tbs, alg, other_sig))


def _signed_by_other_key():
    """Public key A in the request info, signature made by key B over that very info."""
    tbs, alg, _ = _split_signed(_csr_der(L.new_key()))
    sig = L.new_key().sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _pem(_join_signed(tbs, alg, sig))


def _rsa_sha1():
    key = L.new_key("rsa2048")
    tbs, _, _ = _split_signed(_csr_der(key))
    return _pem(_join_signed(tbs, ALG_SHA1_RSA, key.sign(tbs, padding.PKCS1v15(), hashes.SHA1())))


def _ecdsa_sha1():
    key = L.new_key()
    tbs, _, _ = _split_signed(_csr_der(key))
    return _pem(_join_signed(tbs, ALG_ECDSA_SHA1, key.sign(tbs, ec.ECDSA(hashes.SHA1()))))


def _ec_key_rsa_alg():
    """A valid ECDSA-SHA256 signature labelled sha256WithRSAEncryption."""
    key = L.new_key()
    tbs, _, sig = _split_signed(_csr_der(key))
    return _pem(_join_signed(tbs, ALG_SHA256_RSA, sig))


def _sig_unused_bits():
    tbs, alg, sig = _split_signed(_csr_der())
    return _pem(_join_signed(tbs, alg, sig[:-1] + bytes([sig[-1] & 0xFE]), unused_bits=1))


def _point_not_on_curve():
    key = L.new_key()
    der = _csr_der(key)
    point = key.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    assert der.count(point) == 1
    return _pem(der.replace(point, point[:-1] + bytes([point[-1] ^ 0x01])))


def _trailing_der_bytes():
    return _pem(_csr_der() + b"\x00\x00")


def _two_ders_in_one_block():
    return _pem(_csr_der() + _csr_der())


def _outer_length_non_minimal():
    """The outer SEQUENCE's length in a longer form than DER allows (0x83 00 LL LL)."""
    der = _csr_der()
    _, start, end = _read_tlv(der, 0)
    n = end - start
    return _pem(b"\x30\x83" + n.to_bytes(3, "big") + der[start:])


def _extra_element_in_outer_sequence():
    tbs, alg, sig = _split_signed(_csr_der())
    return _pem(_tlv(0x30, tbs + alg + _tlv(0x03, b"\x00" + sig) + _tlv(0x05, b"")))


def _info_extra_element():
    """An extra element at the end of CertificationRequestInfo (the signature covers the info
    without it)."""
    tbs, alg, sig = _split_signed(_csr_der())
    _, start, end = _read_tlv(tbs, 0)
    return _pem(_join_signed(_tlv(0x30, tbs[start:end] + _tlv(0x05, b"")), alg, sig))


def _signature_inside_info():
    """signatureAlgorithm and signature moved *inside* the CertificationRequestInfo SEQUENCE;
    the outer SEQUENCE then holds only the info. Not a CertificationRequest: a DER parser sees
    a one-element SEQUENCE; the signature covers the original info."""
    tbs, alg, sig = _split_signed(_csr_der())
    _, start, end = _read_tlv(tbs, 0)
    return _pem(_tlv(0x30, _tlv(0x30, tbs[start:end] + alg + _tlv(0x03, b"\x00" + sig))))


def _pem_with_headers():
    lines = _good_csr().splitlines()
    return "\n".join([lines[0], "Proc-Type: 4,ENCRYPTED", "DEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF",
                      ""] + lines[1:]) + "\n"


def _rsa(bits, e=65537):
    return _csr(rsa.generate_private_key(public_exponent=e, key_size=bits))


def _ec(curve):
    return _csr(ec.generate_private_key(curve))


def _many_dns_sans(n):
    return _csr(exts=[(x509.SubjectAlternativeName(
        [x509.DNSName(f"host-{i:05d}.example.com") for i in range(n)]), False)])


def _wrong_label():
    return _pem(_csr_der(), "CERTIFICATE")


def _truncated():
    pem = _good_csr()
    return pem[: len(pem) // 2]


def _no_end_line():
    return "\n".join(_good_csr().strip().splitlines()[:-1]) + "\n"


def _two_csrs():
    return _good_csr() + _good_csr()


def _der_as_base64_without_armor():
    return base64.b64encode(_csr_der()).decode()


def _oversized_whitespace():
    return _good_csr() + " " * (65 * 1024)


# --------------------------------------------------------------------------------------------
# Client certificates "from our CA": minted with the CA's intermediate key in the dev state
# dir's SoftHSM token (its PIN is in DIR/hsm-pin) before the server starts. They stand for
# certificates this CA could have signed that are not workload certificates (a server-style
# certificate, an expired one, ...). The server's own TLS key lives only in its memory, so its
# real serving certificate cannot be used as a client certificate.

SOFTHSM_MODULES = [
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
]


class Forger:
    def __init__(self, state, workdir):
        self.state = state
        self.workdir = workdir
        self.ca_pem = L.read(os.path.join(state, "ca-cert.pem"))
        self.ca = x509.load_pem_x509_certificate(self.ca_pem.encode())
        self.module = next(m for m in SOFTHSM_MODULES if os.path.exists(m))
        self.n = 0
        self.key_id = None

    def _pkcs11_tool(self, *args):
        env = dict(os.environ, SOFTHSM2_CONF=os.path.join(self.state, "softhsm2.conf"))
        pin = L.read(os.path.join(self.state, "hsm-pin")).strip()
        res = subprocess.run(["pkcs11-tool", "--module", self.module, "--token-label", "hsmca", "--login",
                              "--pin", pin, *args], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    def _key_id(self, label):
        """The CKA_ID of the private key `label` (pkcs11-tool's --label does not select a key
        for --sign: it would take whichever private key it finds first)."""
        blocks = self._pkcs11_tool("--list-objects", "--type", "privkey").split("Private Key Object")
        ids = [re.search(r"ID:\s*([0-9a-f]+)", b).group(1) for b in blocks
               if re.search(rf"label:\s*{re.escape(label)}\s*$", b, re.M)]
        assert len(ids) == 1, blocks
        return ids[0]

    def _hsm_sign(self, tbs):
        if self.key_id is None:
            self.key_id = self._key_id("hsmca-intermediate")
        self.n += 1
        src = os.path.join(self.workdir, f"tbs-{self.n}.sha256")
        dst = os.path.join(self.workdir, f"sig-{self.n}.raw")
        digest = hashes.Hash(hashes.SHA256())
        digest.update(tbs)
        with open(src, "wb") as f:
            f.write(digest.finalize())  # SoftHSM signs a pre-hashed message with CKM_ECDSA
        self._pkcs11_tool("--sign", "--mechanism", "ECDSA", "--id", self.key_id, "-i", src, "-o", dst)
        raw = L.read(dst, "rb")  # r || s, 32 bytes each
        assert len(raw) == 64, raw.hex()
        return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))

    def leaf(self, sans=(), eku=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
             valid=(-3600, 86400), ca=False, cn=None):
        """(key PEM, chain PEM: leaf + intermediate) signed by our intermediate's HSM key."""
        key = L.new_key()
        now = L.now_utc()
        ski = self.ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
             .issuer_name(self.ca.subject)
             .public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now + datetime.timedelta(seconds=valid[0]))
             .not_valid_after(now + datetime.timedelta(seconds=valid[1]))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(True, False, ca, False, False, ca, False, False, False),
                            critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                            critical=False))
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=not cn)
        scratch = b.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        tbs, alg, _ = _split_signed(scratch.public_bytes(serialization.Encoding.DER))
        der = _join_signed(tbs, alg, self._hsm_sign(tbs))
        cert = x509.load_der_x509_certificate(der)
        self.ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
        return L.key_pem(key), cert.public_bytes(serialization.Encoding.PEM).decode() + self.ca_pem


def _foreign_leaf(sans, valid=(-3600, 86400), issuer_name=None):
    """A leaf from a throwaway CA (optionally with our intermediate's name), with its CA cert."""
    now = L.now_utc()
    ca_key = L.new_key()
    ca_name = issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "throwaway CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=2))
               .not_valid_after(now + datetime.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = L.new_key()
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(seconds=valid[0]))
            .not_valid_after(now + datetime.timedelta(seconds=valid[1]))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=True)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM).decode()  # noqa: E731
    return L.key_pem(key), pem(leaf) + pem(ca_cert)


SPIFFE_FOO = [x509.UniformResourceIdentifier(FOO_HTTPBIN)]


# --------------------------------------------------------------------------------------------
# The server and the audit log


class Hostile:
    def __init__(self, tmp, client):
        self.client = client
        self.kube = L.FakeKube(str(tmp / "kube"), TOKENS)
        try:
            self._start(tmp)
        except BaseException:
            self.kube.stop()
            raise

    def _start(self, tmp):
        client = self.client
        self.state = str(tmp / "state")
        self.audit = os.path.join(self.state, "audit")
        res = L.hsmca("init", "--state-dir", self.state)
        assert res.returncode == 0, res.stdout + res.stderr
        forger = Forger(self.state, str(tmp))
        self.certs = {
            "ours-expired": forger.leaf(SPIFFE_FOO, valid=(-2 * DAY, -3600)),
            "ours-not-yet-valid": forger.leaf(SPIFFE_FOO, valid=(DAY, 2 * DAY)),
            "ours-server-like": forger.leaf([x509.DNSName("istiod.istio-system.svc")],
                                            eku=[ExtendedKeyUsageOID.SERVER_AUTH]),
            "ours-ca-true": forger.leaf(SPIFFE_FOO, ca=True),
            "ours-dns-only": forger.leaf([x509.DNSName("httpbin.foo.svc")]),
            "ours-foreign-trust-domain": forger.leaf(
                [x509.UniformResourceIdentifier("spiffe://evil.example/ns/foo/sa/httpbin")]),
            "ours-no-san": forger.leaf((), cn="no-san"),
            "ours-workload": forger.leaf(SPIFFE_FOO),
        }
        self.server = L.DevServer(self.state, self.kube.kubeconfig, plaintext=True,
                                  log_path=str(tmp / "dev-hostile.log"))
        self.root_pem = self.server.root_pem
        self.tls = client.channel(self.server.target, self.root_pem)
        self.plain = client.channel(f"127.0.0.1:{self.server.plaintext_port}", plaintext=True)

    # -- requests

    def create(self, csr, channel=None, **kw):
        return self.client.create(channel or self.tls, csr, **kw)

    def with_cert(self, name_or_pair):
        key_pem, chain_pem = self.certs[name_or_pair] if isinstance(name_or_pair, str) else name_or_pair
        return self.client.channel(self.server.target, self.root_pem, key_pem=key_pem, chain_pem=chain_pem)

    def raw(self, wire, token=GOOD, channel=None, method=METHOD, **kw):
        call = (channel or self.tls).unary_unary(method, request_serializer=lambda b: b,
                                                 response_deserializer=lambda b: b)
        md = [("authorization", f"Bearer {token}")] if token else None
        return call(wire, metadata=md, timeout=20, **kw)

    # -- the log

    def records(self):
        """Every complete record of the log, in order (a line still being written is skipped)."""
        out = []
        for path in sorted(glob.glob(os.path.join(self.audit, "audit-*.jsonl"))):
            data = L.read(path, "rb")
            lines = data.split(b"\n")
            for line in lines[:-1]:  # the part after the last newline is incomplete (or empty)
                if line:
                    out.append(json.loads(line))
        return out


def _new_records(h, before):
    """Records appended since `before` (a count), without checkpoints."""
    return [r for r in h.records()[before:] if r["kind"] != "checkpoint"]


@pytest.fixture(scope="module")
def h(tmp_path_factory, client):
    tmp = tmp_path_factory.mktemp("hostile")
    hostile = Hostile(tmp, client)
    try:
        yield hostile
    finally:
        if hostile.server.alive():  # test_zz_* normally stopped it already
            hostile.server.stop()
        hostile.kube.stop()


# --------------------------------------------------------------------------------------------
# Wire-level requests (hand-encoded protobuf)



def _field_bytes(num, data):
    return L.varint(num << 3 | 2) + L.varint(len(data)) + data


def _nested_struct_request(depth):
    """A request whose metadata is {"a": {"a": {... depth levels ...}}}, hand-encoded."""
    inner = b""  # an empty Struct
    for _ in range(depth):
        value = _field_bytes(5, inner)  # Value.struct_value
        inner = _field_bytes(1, _field_bytes(1, b"a") + _field_bytes(2, value))  # Struct.fields entry
    return _field_bytes(1, _good_csr().encode()) + _field_bytes(4, inner)


# --------------------------------------------------------------------------------------------
# The table of refusals


@dataclass
class Row:
    name: str
    send: Callable  # (Hostile) -> response; must raise grpc.RpcError
    code: grpc.StatusCode
    msg: Optional[str] = None  # a stable substring of the details
    audited: bool = True
    bug: Optional[str] = None  # xfail(strict=True) reason, for a real server bug


def csr_row(name, build, msg=None, code=IA, bug=None, **kw):
    """A CSR-content row: a valid token, so the CSR check is what refuses."""
    return Row(name, lambda h: h.create(build() if callable(build) else build, token=GOOD, **kw), code, msg,
               bug=bug)


# CSRs with trailing data, a second CSR in the same PEM block, an extra element after the
# signature, or an extra element inside CertificationRequestInfo are refused, as Go's
# x509.ParseCertificateRequest (istiod) and OpenSSL refuse them: the CSR is parsed as strict DER
# and its signature checked over the request info exactly as received.

def tok_row(name, token=None, header=None, msg=None, **kw):
    """An authentication row: a good CSR with this token (or raw authorization header)."""
    def send(h):
        extra = [("authorization", header)] if header is not None else []
        return h.create(_good_csr(), token=token, extra_md=extra, **kw)
    return Row(name, send, UA, msg)


def ttl_row(name, validity):
    return Row(name, lambda h: h.create(_good_csr(), token=GOOD, validity=validity), IA,
               "greater than the max allowed TTL")


def md_row(name, struct, msg="request impersonation authentication failure", token=GOOD):
    return Row(name, lambda h: h.create(_good_csr(), token=token, metadata_struct=struct), UA, msg)


def cert_row(name, cert, msg=None, **kw):
    """The caller presents a client certificate (and no token) and the service refuses it."""
    return Row(name, lambda h: h.create(_good_csr(), channel=h.with_cert(cert), **kw), UA, msg)


def handshake_row(name, cert):
    # The TLS layer (rustls' WebPKI client verifier, chained to DIR/root-cert.pem) rejects the
    # certificate during the handshake: no HTTP/2 stream is ever opened, so CreateCertificate
    # never runs and there is no request to audit. The client sees a connection failure.
    def send(h):
        pair = cert(h) if callable(cert) else h.certs[cert]
        return h.create(_good_csr(), channel=h.with_cert(pair))
    return Row(name, send, grpc.StatusCode.UNAVAILABLE, None, audited=False)


HUGE_STRUCT = {f"field-{i:05d}": "x" * 24 for i in range(5000)}


def _struct_size(d):
    from google.protobuf import struct_pb2
    s = struct_pb2.Struct()
    s.update(d)
    return s.ByteSize()


# Many fields, yet the whole request stays under the server's 256 KiB message limit.
assert 200_000 < _struct_size(HUGE_STRUCT) < 240_000

REFUSED = [
    # ---- the CSR field (a valid token: authentication passes, the CSR check refuses)
    csr_row("csr-empty", "", "empty CSR"),
    csr_row("csr-whitespace", " \n\t\r\n  ", "empty CSR"),
    csr_row("csr-oversized-whitespace-padding", _oversized_whitespace, "at most 65536"),
    csr_row("csr-oversized-many-sans", lambda: _many_dns_sans(3000), "at most 65536"),
    csr_row("csr-not-pem", "this is not a certificate request", "invalid CSR"),
    csr_row("csr-der-base64-no-armor", _der_as_base64_without_armor, "invalid CSR"),
    csr_row("csr-der-in-pem-label-certificate", _wrong_label, "invalid CSR"),
    csr_row("csr-private-key-pem", lambda: L.key_pem(L.new_key()), "invalid CSR"),
    Row("csr-certificate-pem", lambda h: h.create(h.server.intermediate_pem, token=GOOD), IA,
        "is not CERTIFICATE REQUEST"),
    csr_row("csr-truncated-pem", _truncated, "invalid CSR"),
    csr_row("csr-pem-without-end-line", _no_end_line, "invalid CSR"),
    csr_row("csr-base64-garbage", "-----BEGIN CERTIFICATE REQUEST-----\n!!!!not*base64$$$$\n"
            "-----END CERTIFICATE REQUEST-----\n", "invalid CSR"),
    csr_row("csr-base64-of-non-der", "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS\n"
            "-----END CERTIFICATE REQUEST-----\n", "invalid CSR"),
    csr_row("csr-der-trailing-zero-bytes", _trailing_der_bytes, msg="invalid CSR"),
    csr_row("csr-two-ders-in-one-pem-block", _two_ders_in_one_block, msg="invalid CSR"),
    csr_row("csr-der-extra-element-in-outer-sequence", _extra_element_in_outer_sequence,
            msg="invalid CSR"),
    csr_row("csr-info-extra-element", _info_extra_element, "invalid CSR"),
    csr_row("csr-signature-inside-info-sequence", _signature_inside_info, msg="invalid CSR"),
    csr_row("csr-der-outer-length-non-minimal", _outer_length_non_minimal, "invalid CSR"),
    csr_row("csr-pem-with-encryption-headers", _pem_with_headers, "invalid CSR"),
    csr_row("csr-two-csrs-in-one-field", _two_csrs, "invalid CSR"),
    csr_row("csr-trailing-text-after-end", lambda: _good_csr() + "and then some text\n",
            "invalid CSR"),
    csr_row("csr-nul-byte-prefix", lambda: "\x00" + _good_csr(), "invalid CSR"),
    # ---- the CSR's signature
    csr_row("csr-signature-over-other-bytes", _sig_over_other_bytes, "CSR signature"),
    csr_row("csr-signed-by-another-key", _signed_by_other_key, "CSR signature"),
    csr_row("csr-signature-byte-flipped", lambda: L.corrupt_csr_signature(_good_csr()), "CSR signature"),
    csr_row("csr-rsa-sha1-signature", _rsa_sha1, "CSR signature"),
    csr_row("csr-ecdsa-sha1-signature", _ecdsa_sha1, "CSR signature"),
    csr_row("csr-ec-key-rsa-signature-algorithm", _ec_key_rsa_alg, "CSR signature"),
    csr_row("csr-rsa-pss-signature", lambda: _csr(
        L.new_key("rsa2048"), rsa_padding=padding.PSS(padding.MGF1(hashes.SHA256()), 32)), "CSR signature"),
    csr_row("csr-signature-bitstring-unused-bits", _sig_unused_bits, "signature bit string has unused bits"),
    # ---- the CSR's key
    csr_row("key-rsa-1024", lambda: _rsa(1024), "RSA key of 1024 bits"),
    csr_row("key-rsa-1536", lambda: _rsa(1536), "RSA key of 1536 bits"),
    csr_row("key-rsa-2040", lambda: _rsa(2040), "RSA key of 2040 bits"),
    csr_row("key-rsa-4104", lambda: _rsa(4104), "RSA key of 4104 bits"),
    csr_row("key-rsa-8192", lambda: _rsa(8192), "RSA key of 8192 bits"),
    csr_row("key-rsa-exponent-3", lambda: _rsa(2048, e=3), "exponent"),
    csr_row("key-ec-p192", lambda: _ec(ec.SECP192R1()), "only P-256 and P-384"),
    csr_row("key-ec-p224", lambda: _ec(ec.SECP224R1()), "only P-256 and P-384"),
    csr_row("key-ec-secp256k1", lambda: _ec(ec.SECP256K1()), "only P-256 and P-384"),
    csr_row("key-ec-p521", lambda: _ec(ec.SECP521R1()), "only P-256 and P-384"),
    csr_row("key-ec-brainpool-p256r1", lambda: _ec(ec.BrainpoolP256R1()), "only P-256 and P-384"),
    csr_row("key-ec-point-not-on-curve", _point_not_on_curve, "invalid P-256 point"),
    csr_row("key-ed25519", lambda: _csr(ed25519.Ed25519PrivateKey.generate(), hash_alg=None),
            "public key algorithm"),
    csr_row("key-ed448", lambda: _csr(ed448.Ed448PrivateKey.generate(), hash_alg=None),
            "public key algorithm"),
    csr_row("key-dsa-2048", lambda: _csr(dsa.generate_private_key(2048)), "public key algorithm"),
    # ---- validity_duration above the maximum (90 days)
    ttl_row("ttl-90-days-plus-1s", 90 * DAY + 1),
    ttl_row("ttl-91-days", 91 * DAY),
    ttl_row("ttl-2-pow-40", 2**40),
    ttl_row("ttl-i64-max", I64_MAX),
    # ---- request metadata (Struct): impersonation from an untrusted caller, in any shape
    md_row("md-impersonate-other-sa", {"ImpersonatedIdentity": L.spiffe("kube-system", "admin")}),
    md_row("md-impersonate-own-identity", {"ImpersonatedIdentity": FOO_HTTPBIN}),
    md_row("md-impersonate-not-spiffe", {"ImpersonatedIdentity": "root"}),
    md_row("md-impersonate-number", {"ImpersonatedIdentity": 42}, "must be a string"),
    md_row("md-impersonate-bool", {"ImpersonatedIdentity": True}, "must be a string"),
    md_row("md-impersonate-null", {"ImpersonatedIdentity": None}, "must be a string"),
    md_row("md-impersonate-list", {"ImpersonatedIdentity": [FOO_HTTPBIN, L.spiffe("foo", "bar")]},
           "must be a string"),
    md_row("md-impersonate-struct", {"ImpersonatedIdentity": {"id": L.spiffe("foo", "bar")}},
           "must be a string"),
    md_row("md-impersonate-in-huge-struct",
           dict(HUGE_STRUCT, ImpersonatedIdentity=L.spiffe("foo", "bar"))),
    # ---- bearer tokens
    tok_row("token-missing", None, msg="no credentials"),
    tok_row("token-empty-bearer", header="Bearer ", msg="no credentials"),
    tok_row("token-bearer-only-spaces", header="Bearer      ", msg="no credentials"),
    tok_row("token-basic-scheme", header="Basic Zm9vOmJhcg==", msg="no credentials"),
    tok_row("token-lowercase-bearer-scheme", header=f"bearer {GOOD}", msg="no credentials"),
    tok_row("token-without-scheme", header=GOOD, msg="no credentials"),
    tok_row("token-malformed-not-jwt", "not-a-jwt", msg="token rejected"),
    tok_row("token-unknown-jwt", L.UNKNOWN_TOKEN, msg="token rejected"),
    tok_row("token-expired", EXPIRED_TOKEN, msg="token rejected"),
    tok_row("token-wrong-issuer", WRONG_ISSUER_TOKEN, msg="token rejected"),
    tok_row("token-wrong-audience", L.TOKEN["wrong-audience"], msg="token rejected"),
    tok_row("token-huge", "A" * 6000, msg="token rejected"),
    tok_row("token-user-not-serviceaccount", L.TOKEN["user-alice"], msg="not a service-account token"),
    tok_row("token-sa-name-without-sa-group", L.TOKEN["sa-name-without-group"],
            msg="not a service-account token"),
    tok_row("token-node-user-in-sa-group", TOK["node-user"], msg="is not system:serviceaccount"),
    tok_row("token-username-too-many-colons", TOK["too-many-colons"], msg="is not system:serviceaccount"),
    tok_row("token-username-empty-namespace", TOK["empty-namespace"], msg="is not system:serviceaccount"),
    # ---- clusterid
    tok_row("clusterid-repeated-same", GOOD, cluster_ids=["Kubernetes", "Kubernetes"], msg="given 2 times"),
    tok_row("clusterid-repeated-different", GOOD, cluster_ids=["Kubernetes", "other"], msg="given 2 times"),
    tok_row("clusterid-unknown", GOOD, cluster_ids=["cluster-nobody-knows"], msg="cluster-nobody-knows"),
    tok_row("clusterid-wrong-case", GOOD, cluster_ids=["kubernetes"], msg="only knows clusters"),
    # ---- plaintext listener: nobody is authenticated there, whatever they present
    Row("plaintext-valid-token", lambda h: h.create(_good_csr(), channel=h.plain, token=GOOD), UA,
        "never accepted over plaintext"),
    Row("plaintext-no-credentials", lambda h: h.create(_good_csr(), channel=h.plain), UA, "use TLS"),
    Row("plaintext-valid-token-impersonating", lambda h: h.create(
        _good_csr(), channel=h.plain, token=GOOD,
        metadata_struct={"ImpersonatedIdentity": L.spiffe("foo", "bar")}), UA, "never accepted over plaintext"),
    Row("plaintext-valid-token-bad-csr", lambda h: h.create("garbage", channel=h.plain, token=GOOD), UA,
        "never accepted over plaintext"),
    # ---- client certificates the TLS layer accepts (chained to our root) but that are no identity
    cert_row("cert-ours-dns-sans-only", "ours-dns-only", "no SPIFFE ID in trust domain cluster.local"),
    cert_row("cert-ours-foreign-trust-domain", "ours-foreign-trust-domain", "no SPIFFE ID in trust domain"),
    cert_row("cert-ours-no-san", "ours-no-san", "SAN extension does not exist"),
    cert_row("cert-ours-workload-impersonating", "ours-workload", "request impersonation authentication failure",
             metadata_struct={"ImpersonatedIdentity": L.spiffe("foo", "bar")}),
    Row("cert-ours-workload-bad-csr", lambda h: h.create("garbage", channel=h.with_cert("ours-workload")), IA,
        "invalid CSR"),
    Row("cert-ours-workload-ttl-too-long", lambda h: h.create(
        _good_csr(), channel=h.with_cert("ours-workload"), validity=91 * DAY), IA, "max allowed TTL"),
    # ---- client certificates the TLS handshake rejects (not audited: see handshake_row)
    handshake_row("cert-foreign-ca-spiffe", lambda h: _foreign_leaf(SPIFFE_FOO)),
    handshake_row("cert-foreign-ca-named-like-our-intermediate", lambda h: _foreign_leaf(
        SPIFFE_FOO, issuer_name=x509.load_pem_x509_certificate(h.server.intermediate_pem.encode()).subject)),
    handshake_row("cert-foreign-ca-expired", lambda h: _foreign_leaf(SPIFFE_FOO, valid=(-2 * DAY, -3600))),
    handshake_row("cert-ours-expired", "ours-expired"),
    handshake_row("cert-ours-not-yet-valid", "ours-not-yet-valid"),
    handshake_row("cert-ours-server-auth-only", "ours-server-like"),
    handshake_row("cert-ours-ca-true-as-leaf", "ours-ca-true"),
    # ---- transport-level rejections (not audited: the service never runs)
    # tonic refuses a message above max_decoding_message_size (256 KiB) while decoding, before
    # CreateCertificate is called.
    Row("grpc-message-over-256KiB", lambda h: h.create("A" * (300 * 1024), token=GOOD),
        grpc.StatusCode.OUT_OF_RANGE, "message length too large", audited=False),
    # A proto3 `string` must be UTF-8: prost fails to decode the request, before the service.
    Row("grpc-csr-not-utf8", lambda h: h.raw(_field_bytes(1, _csr_der())),
        grpc.StatusCode.INTERNAL, "failed to decode", audited=False),
    Row("grpc-metadata-key-not-utf8", lambda h: h.raw(_field_bytes(1, _good_csr().encode()) + _field_bytes(
        4, _field_bytes(1, _field_bytes(1, b"\xff\xfe") + _field_bytes(2, _field_bytes(3, b"x"))))),
        grpc.StatusCode.INTERNAL, "failed to decode", audited=False),
    # Not protobuf at all (a truncated length-delimited field): a decoding error, before the service.
    Row("grpc-truncated-protobuf", lambda h: h.raw(b"\x0a\xff\xff\x03abc"),
        grpc.StatusCode.INTERNAL, "failed to decode", audited=False),
    # Metadata nested 1000 Structs deep: prost's recursion limit (100) stops the decoder, before
    # the service runs (and before anything could overflow the stack).
    Row("grpc-metadata-nested-1000-deep", lambda h: h.raw(_nested_struct_request(1000)),
        grpc.StatusCode.INTERNAL, "recursion limit", audited=False),
    # A method the service does not have: routed nowhere.
    Row("grpc-unknown-method", lambda h: h.raw(b"", method="/istio.v1.auth.IstioCertificateService/Sign"),
        grpc.StatusCode.UNIMPLEMENTED, None, audited=False),
    # A gzip-compressed message: the server has no decompression enabled, so tonic answers
    # before decoding.
    Row("grpc-gzip-compressed", lambda h: h.raw(_field_bytes(1, _good_csr().encode()),
                                                compression=grpc.Compression.Gzip),
        grpc.StatusCode.UNIMPLEMENTED, "gzip", audited=False),
]

assert len({r.name for r in REFUSED}) == len(REFUSED)


def _params(rows):
    out = []
    for r in rows:
        marks = [pytest.mark.xfail(strict=True, reason=r.bug)] if r.bug else []
        out.append(pytest.param(r, id=r.name, marks=marks))
    return out


def _kinds(records):
    return [r["kind"] for r in records]


@pytest.mark.parametrize("row", _params(REFUSED))
def test_refused(h, row):
    before = len(h.records())
    signed_before = sum(1 for r in h.records() if r["kind"] == "signed")
    err = L.rpc_error(row.send, h)
    details = err.details() or ""
    print(f"{row.name}: {err.code()}: {details}")
    assert err.code() == row.code, f"{row.name}: got {err.code()}: {details!r}"
    if row.msg:
        assert row.msg in details, f"{row.name}: {details!r} lacks {row.msg!r}"

    new = _new_records(h, before)
    # (2) nothing was signed, nor even approved for signing.
    assert sum(1 for r in h.records() if r["kind"] == "signed") == signed_before
    assert not [r for r in new if r["kind"] in ("signing", "signed", "failed")], new
    if row.audited:
        # (3) exactly one refusal record, with the status and message the caller got.
        assert _kinds(new) == ["decision"], f"{row.name}: new records {new}"
        rec = new[0]
        assert rec["decision"] == "deny", rec
        assert rec["status"] == STATUS_NAME[row.code], rec
        assert rec["reason"] == details, rec
        assert "serial" not in rec and "cert_sha256" not in rec, rec
    else:
        # The service never saw the request: nothing at all was recorded.
        assert new == [], f"{row.name}: the transport refused it, yet the log has {new}"
    assert h.server.alive(), h.server.diagnostics()


# --------------------------------------------------------------------------------------------
# Hostile requests that are answered: whatever the CSR or metadata asks, the leaf is CA:false
# and names only the caller.


def _ext_csr():
    return _csr(cn=L.spiffe("kube-system", "admin"), exts=[
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(True, False, False, False, False, True, True, False, False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.OCSP_SIGNING]), False),
        (x509.NameConstraints(permitted_subtrees=[x509.DNSName("evil.example")], excluded_subtrees=None), True),
    ])


def _other_identities_csr():
    import ipaddress
    return _csr(cn="*.cluster.local", exts=[(x509.SubjectAlternativeName([
        x509.UniformResourceIdentifier(L.spiffe("kube-system", "admin")),
        x509.UniformResourceIdentifier("spiffe://evil.example/ns/foo/sa/httpbin"),
        x509.DNSName("*"),
        x509.DNSName("*.svc.cluster.local"),
        x509.DNSName("istiod.istio-system.svc"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
        x509.RFC822Name("admin@cluster.local"),
    ]), False)])


@dataclass
class Ok:
    name: str
    send: Callable  # (Hostile) -> cert_chain
    lifetime: Optional[int] = None  # expected leaf lifetime in seconds (± clock skew)


def ok_row(name, csr=_good_csr, lifetime=None, **kw):
    return Ok(name, lambda h: h.create(csr(), token=GOOD, **kw), lifetime)


ACCEPTED = [
    ok_row("csr-asks-ca-true-keycertsign-codesigning-nameconstraints", _ext_csr),
    ok_row("csr-asks-other-identities-and-wildcards", _other_identities_csr),
    ok_row("csr-asks-1000-dns-sans", lambda: _many_dns_sans(1000)),
    ok_row("ttl-negative-is-default", validity=-1, lifetime=DAY),
    ok_row("ttl-zero-is-default", validity=0, lifetime=DAY),
    ok_row("ttl-i64-min-is-default", validity=I64_MIN, lifetime=DAY),
    ok_row("ttl-90-days-exactly", validity=90 * DAY, lifetime=90 * DAY),
    ok_row("md-huge-struct-without-impersonation", metadata_struct=HUGE_STRUCT),
    ok_row("md-odd-types-in-unrelated-keys", metadata_struct={
        "nested": {"a": [1, 2.5, None, True, {"b": []}], "c": {}}, "null": None, "nan": float("nan"),
        "inf": float("-inf"), "list": [[[]]], "unicode": "\u202e\U0001f600", "": "empty key"}),
    ok_row("md-impersonated-identity-empty-string", metadata_struct={"ImpersonatedIdentity": ""}),
    ok_row("md-impersonated-identity-other-case-key", metadata_struct={
        "impersonatedidentity": L.spiffe("foo", "bar"), "IMPERSONATEDIDENTITY": L.spiffe("foo", "bar")}),
    ok_row("clusterid-empty-means-local", cluster_ids=[""]),
    Ok("grpc-unknown-protobuf-fields-ignored", lambda h: h.client.pb2.IstioCertificateResponse.FromString(
        h.raw(_field_bytes(1, _good_csr().encode()) + L.varint(2 << 3) + L.varint(7) + _field_bytes(99, b"junk"))
    ).cert_chain),
    Ok("client-cert-ours-workload-renewal", lambda h: h.create(_good_csr(), channel=h.with_cert("ours-workload"))),
]


@pytest.mark.parametrize("row", [pytest.param(r, id=r.name) for r in ACCEPTED])
def test_accepted_but_constrained(h, row):
    before = len(h.records())
    chain = list(row.send(h))
    certs = L.load_chain(chain)
    leaf = certs[0]
    assert chain[-1].strip() == h.root_pem.strip()
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False, bc
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert not ku.key_cert_sign and not ku.crl_sign, ku
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) <= {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}, eku
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.NameConstraints)
    assert L.san_strings(leaf) == [f"URI:{FOO_HTTPBIN}"]
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    assert cns in ([], [FOO_HTTPBIN]), cns
    if row.lifetime is not None:
        got = L.lifetime(leaf).total_seconds()
        assert row.lifetime <= got <= row.lifetime + 600, got
    new = _new_records(h, before)
    assert _kinds(new) == ["signing", "signed"], new
    assert new[1]["decision"] == "allow" and new[1]["identities"] == [FOO_HTTPBIN], new[1]


# --------------------------------------------------------------------------------------------
# Many concurrent streams on one channel


def test_many_concurrent_streams_one_channel(h):
    n = 200
    csrs = [_good_csr() for _ in range(n)]
    ch = h.client.channel(h.server.target, h.root_pem)  # one channel: one HTTP/2 connection
    stub = h.client.pb2_grpc.IstioCertificateServiceStub(ch)
    signed_before = sum(1 for r in h.records() if r["kind"] == "signed")
    md = [("authorization", f"Bearer {GOOD}")]
    started = time.monotonic()
    futures = [stub.CreateCertificate.future(h.client.pb2.IstioCertificateRequest(csr=c), metadata=md,
                                             timeout=60) for c in csrs]
    leaves, errors = [], []
    for f in futures:
        try:
            leaves.append(L.load_chain(list(f.result(timeout=90).cert_chain))[0])
        except grpc.RpcError as e:
            errors.append((e.code(), e.details()))
    elapsed = time.monotonic() - started
    assert errors == [], errors[:5]
    assert len({c.serial_number for c in leaves}) == n
    assert all(L.san_strings(c) == [f"URI:{FOO_HTTPBIN}"] for c in leaves)
    # Each leaf certifies the key of its own CSR (no mix-up between concurrent streams).
    for leaf, csr in zip(leaves, csrs):
        assert leaf.public_key() == x509.load_pem_x509_csr(csr.encode()).public_key()
    assert sum(1 for r in h.records() if r["kind"] == "signed") == signed_before + n
    print(f"{n} concurrent CreateCertificate on one channel: {elapsed:.1f} s")


# --------------------------------------------------------------------------------------------
# After everything: still serving, clean stop, intact log


def test_zz_server_survives_stops_cleanly_and_log_verifies(h):
    assert h.server.alive(), h.server.diagnostics()
    chain = h.create(_good_csr(), token=GOOD)
    assert L.san_strings(L.load_chain(chain)[0]) == [f"URI:{FOO_HTTPBIN}"]
    rc = h.server.stop()
    assert rc == 0 and not h.server.orphans, (rc, h.server.orphans, h.server.diagnostics())
    res = L.hsmca("audit", "verify", h.audit)
    assert res.returncode == 0 and res.stdout.startswith("OK: "), res.stdout + res.stderr
    # No token reached the log.
    text = "".join(L.read(p) for p in glob.glob(os.path.join(h.audit, "audit-*.jsonl")))
    for tok in list(TOKENS) + [EXPIRED_TOKEN, WRONG_ISSUER_TOKEN]:
        assert tok not in text


def test_row_count():
    assert len(REFUSED) + len(ACCEPTED) + 1 >= 60
