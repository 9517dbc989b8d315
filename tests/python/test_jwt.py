"""JWT/OIDC authentication for workloads outside Kubernetes: RS256 and ES256 tokens from a
configured issuer, checked against its JWKS; everything else about the token is refused."""

import base64
import json
import time

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

import hsmca_testlib as L

ISSUER = "https://oidc.example.test"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(n):
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


@pytest.fixture(scope="module")
def keys():
    return {"rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec": ec.generate_private_key(ec.SECP256R1()),
            "stranger": ec.generate_private_key(ec.SECP256R1())}


def jwks(keys):
    r = keys["rsa"].public_key().public_numbers()
    e = keys["ec"].public_key().public_numbers()
    return {"keys": [
        {"kty": "RSA", "kid": "r1", "alg": "RS256", "n": uint(r.n), "e": uint(r.e)},
        {"kty": "EC", "kid": "e1", "crv": "P-256", "x": b64(e.x.to_bytes(32, "big")), "y": b64(e.y.to_bytes(32, "big"))},
    ]}


def token(keys, key="rsa", alg=None, kid=None, **claims):
    now = int(time.time())
    body = {"iss": ISSUER, "sub": "system:serviceaccount:vm:billing", "aud": ["istio-ca"],
            "iat": now, "exp": now + 600}
    body.update(claims)
    alg = alg or ("RS256" if key == "rsa" else "ES256")
    header = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}".encode()
    if alg == "none":
        return signing_input.decode() + "."
    k = keys[key]
    if key == "rsa":
        sig = k.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(k.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode()}.{b64(sig)}"


@pytest.fixture(scope="module")
def jwt_dev(workdir, kube, keys):
    path = workdir / "oidc-jwks.json"
    path.write_text(json.dumps(jwks(keys)))
    server = L.DevServer(str(workdir / "jwt-state"), kube.kubeconfig,
                         extra_args=["--jwt-issuer", ISSUER, "--jwt-jwks", str(path)],
                         log_path=str(workdir / "dev-jwt.log"))
    yield server
    assert server.stop() == 0, server.diagnostics()


def test_rs256_and_es256_tokens_get_the_subjects_identity(jwt_dev, client, keys):
    ch = client.channel(jwt_dev.target, jwt_dev.root_pem)
    for t in (token(keys, "rsa", kid="r1"), token(keys, "ec", kid="e1"), token(keys, "ec")):
        chain = client.create(ch, L.make_csr()[1], token=t)
        leaf = L.load_chain(chain)[0]
        assert L.san_strings(leaf) == ["URI:spiffe://cluster.local/ns/vm/sa/billing"]


def test_kubernetes_tokens_still_work_beside_jwt(jwt_dev, client):
    ch = client.channel(jwt_dev.target, jwt_dev.root_pem)
    leaf = L.load_chain(client.create(ch, L.make_csr()[1], token=L.GOOD_TOKEN))[0]
    assert L.san_strings(leaf) == ["URI:spiffe://cluster.local/ns/foo/sa/httpbin"]


@pytest.mark.parametrize("name,make,needle", [
    ("unknown key", lambda k: token(k, "stranger", alg="ES256"), "does not verify"),
    ("alg none", lambda k: token(k, alg="none"), "does not verify"),
    ("alg HS256", lambda k: token(k, alg="HS256"), "does not verify"),
    ("kid of another key", lambda k: token(k, "rsa", kid="e1"), "does not verify"),
    ("expired", lambda k: token(k, exp=int(time.time()) - 3600), "expired"),
    ("not yet valid", lambda k: token(k, nbf=int(time.time()) + 3600), "not valid yet"),
    ("wrong audience", lambda k: token(k, aud="other"), "audience"),
    ("no audience", lambda k: token(k, aud=[]), "audience"),
    ("subject not a service account", lambda k: token(k, sub="alice@example.test"), "subject"),
    ("subject with extra parts", lambda k: token(k, sub="system:serviceaccount:a:b:c"), "subject"),
    ("tampered payload", lambda k: token(k).replace(token(k).split(".")[1], b64(json.dumps(
        {"iss": ISSUER, "sub": "system:serviceaccount:kube-system:admin", "aud": ["istio-ca"],
         "exp": int(time.time()) + 600}).encode())), "does not verify"),
])
def test_bad_tokens_are_refused(jwt_dev, client, keys, name, make, needle):
    ch = client.channel(jwt_dev.target, jwt_dev.root_pem)
    err = L.rpc_error(client.create, ch, L.make_csr()[1], token=make(keys))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.details())
    assert needle in err.details(), (name, err.details())


def test_tokens_of_other_issuers_fall_through_to_the_kubernetes_authenticator(jwt_dev, client, keys):
    ch = client.channel(jwt_dev.target, jwt_dev.root_pem)
    err = L.rpc_error(client.create, ch, L.make_csr()[1], token=token(keys, iss="https://elsewhere.test"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "kube-jwt: token rejected" in err.details() and "jwt:" not in err.details().replace("kube-jwt:", "")
