#!/usr/bin/env python3
"""A stand-in for the Kubernetes API server, serving only the TokenReview API over HTTPS.

No real API server can run on the test machines, so tests run this in its place. It speaks the
real wire shape: `POST /apis/authentication.k8s.io/v1/tokenreviews` with a TokenReview JSON body,
answered with the TokenReview and its `status`, like kube-apiserver. The CA authenticates to it
with its own bearer token, as it would with RBAC.

Usage: fake_kube_apiserver.py --dir DIR --tokens TOKENS.json
  TOKENS.json maps a workload token to {"username": ..., "groups": [...], "audiences": [...],
  "extra": {...}}. Writes DIR/kubeconfig, DIR/ca.pem, prints "listening on PORT", and counts
  reviews at GET /stats.
"""

import argparse
import datetime
import ipaddress
import json
import os
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_TOKEN = "hsmca-reviewer-token"


def make_cert(directory):
    """A CA (written to DIR/ca.pem for the kubeconfig) and a serving leaf for 127.0.0.1."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-kube-apiserver CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = os.path.join(directory, "ca.pem")
    cert_path = os.path.join(directory, "serving.pem")
    key_path = os.path.join(directory, "serving-key.pem")
    with open(ca_path, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(cert_path, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return ca_path, cert_path, key_path


class State:
    def __init__(self, tokens):
        self.tokens = tokens
        self.reviews = 0
        self.lock = threading.Lock()


def handler_for(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # keep test output quiet
            pass

        def reply(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/stats":
                with state.lock:
                    self.reply(200, {"tokenreviews": state.reviews})
            else:
                self.reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.headers.get("Authorization") != f"Bearer {CA_TOKEN}":
                return self.reply(401, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "Unauthorized", "code": 401})
            if self.path.split("?")[0] != "/apis/authentication.k8s.io/v1/tokenreviews":
                return self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404})
            review = json.loads(body)
            with state.lock:
                state.reviews += 1
            spec = review.get("spec", {})
            token = spec.get("token", "")
            wanted = spec.get("audiences") or []
            entry = state.tokens.get(token)
            status = {"authenticated": False, "user": {}}
            if entry is None:
                status["error"] = "[invalid bearer token, token lookup failed]"
            else:
                accepted = [a for a in entry.get("audiences", []) if a in wanted]
                if wanted and not accepted:
                    status["error"] = (
                        f"[invalid bearer token, token audiences {entry.get('audiences')} "
                        f"is invalid for the target audiences {wanted}]"
                    )
                else:
                    status = {
                        "authenticated": True,
                        "user": {
                            "username": entry["username"],
                            "uid": "uid-" + entry["username"],
                            "groups": entry.get("groups", []),
                            "extra": entry.get("extra", {}),
                        },
                        "audiences": accepted,
                    }
            review["status"] = status
            review.setdefault("apiVersion", "authentication.k8s.io/v1")
            review.setdefault("kind", "TokenReview")
            self.reply(201, review)

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with open(args.tokens) as f:
        tokens = json.load(f)
    ca, cert, key = make_cert(args.dir)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(State(tokens)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    kubeconfig = os.path.join(args.dir, "kubeconfig")
    with open(kubeconfig, "w") as f:
        f.write(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: https://127.0.0.1:{port}\n"
            f"    certificate-authority: {ca}\n"
            f"users:\n- name: hsmca\n  user:\n    token: {CA_TOKEN}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: hsmca\n"
            "current-context: fake\n"
        )
    print(f"listening on {port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
