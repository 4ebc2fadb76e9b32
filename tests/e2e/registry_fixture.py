"""Registries with authentication and hostile relays, on top of the plain loopback
registry of ``graven.testing.registry``.

Flavours: anonymous, htpasswd Basic auth, and token auth backed by a tiny
token server (ES256 JWTs carrying an ``x5c`` chain that the registry checks against
a self-signed certificate it trusts). Also a loopback proxy that flips a byte of
every blob it relays, to prove pulls verify what they receive.

Everything binds to 127.0.0.1 and is stopped by PID (or shut down) at the end.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.client
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from graven.testing.registry import Registry, running_registry

SERVICE = "graven-test-registry"
ISSUER = "graven-test-token-issuer"


@contextlib.contextmanager
def basic_auth_registry(tmp: Path, username: str, password: str) -> Iterator[Registry]:
    """A registry behind htpasswd (bcrypt) Basic auth."""
    tmp.mkdir(parents=True, exist_ok=True)
    line = subprocess.run(
        ["htpasswd", "-Bbn", username, password], check=True, capture_output=True, text=True
    ).stdout.strip()
    htpasswd = tmp / "htpasswd"
    htpasswd.write_text(line + "\n")
    auth = {"htpasswd": {"realm": "graven-test", "path": str(htpasswd)}}
    with running_registry(tmp, auth) as reg:
        reg.username, reg.password = username, password
        yield reg


# --- token auth ----------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class TokenIssuer:
    """Signs registry tokens (ES256, x5c) with a fresh P-256 key and self-signed cert."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    username: str
    password: str
    issued: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, username: str, password: str) -> TokenIssuer:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, username, password)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "ES256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": _b64url(os.urandom(12)),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _parse_scope(scope: str) -> dict[str, Any] | None:
    match = re.fullmatch(r"([a-z]+):(.+):([a-z*,]+)", scope)
    if not match:
        return None
    return {"type": match[1], "name": match[2], "actions": match[3].split(",")}


def _token_handler(issuer: TokenIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            subject = "anonymous"
            auth = self.headers.get("Authorization", "")
            if auth.startswith("Basic "):
                user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                if (user, password) != (issuer.username, issuer.password):
                    self._reply(401, {"details": "bad credentials"})
                    return
                subject = user
            access: list[dict[str, Any]] = []
            for scope in query.get("scope", []):
                for part in scope.split():
                    parsed = _parse_scope(part)
                    if parsed is None:
                        continue
                    if subject == "anonymous":
                        parsed["actions"] = []  # anonymous: a token granting nothing
                    elif parsed["name"].startswith("readonly/"):
                        parsed["actions"] = [a for a in parsed["actions"] if a == "pull"]
                    access.append(parsed)
            issuer.issued.append(
                {"subject": subject, "scopes": query.get("scope", []), "access": access}
            )
            token = issuer.token(subject, access)
            self._reply(200, {"token": token, "access_token": token, "expires_in": 300})

        def _reply(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    """Run ``server`` in a thread; shut it down at the end."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def token_auth_registry(tmp: Path, username: str, password: str) -> Iterator[Registry]:
    """A registry that accepts only tokens from our token server (Bearer auth). The
    user may pull and push anywhere, except only pull under ``readonly/``."""
    tmp.mkdir(parents=True, exist_ok=True)
    issuer = TokenIssuer.create(username, password)
    bundle = tmp / "token-ca.pem"
    bundle.write_bytes(issuer.cert_pem())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(issuer))
    realm = f"http://127.0.0.1:{server.server_address[1]}/token"
    auth = {
        "token": {
            "realm": realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(bundle),
        }
    }
    with serving(server), running_registry(tmp, auth) as reg:
        reg.username, reg.password = username, password
        reg.extra["issuer"] = issuer
        reg.extra["realm"] = realm
        yield reg


# --- proxies: faults between client and registry -----------------------------------------

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
BLOB_PATH = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Canned:
    """A reply the proxy sends instead of relaying (``drop``: close without a reply)."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    drop: bool = False


# hook(method, path) -> a canned reply, a path to relay instead, or None to relay as is.
Hook = Callable[[str, str], Canned | str | None]
# transform(method, path, status, body) -> the body to send back.
Transform = Callable[[str, str, int, bytes], bytes]


def _relay_handler(upstream: str, hook: Hook, transform: Transform) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._handle()

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = urllib.parse.urlsplit(self.path).path
            action = hook(self.command, path)
            target = self.path
            if isinstance(action, str):
                target, action = action, None
            canned = action
            if canned is not None and canned.drop:
                self.close_connection = True
                return
            if canned is not None:
                status, headers, reply = canned.status, list(canned.headers), canned.body
            else:
                conn = http.client.HTTPConnection(upstream, timeout=10)
                sent = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn.request(self.command, target, body=body or None, headers=sent)
                resp = conn.getresponse()
                status, headers, reply = resp.status, resp.getheaders(), resp.read()
                conn.close()
                reply = transform(self.command, path, status, reply)
            self.send_response(status)
            declared = str(len(reply))
            for key, value in headers:
                if key.lower() == "content-length" and self.command == "HEAD":
                    declared = value  # a HEAD reply declares the size of what GET would send
                elif key.lower() not in _HOP_BY_HOP | {"content-length"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", declared)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply)

    return Handler


@contextlib.contextmanager
def relay_proxy(
    upstream: str,
    hook: Hook = lambda method, path: None,
    transform: Transform = lambda method, path, status, body: body,
) -> Iterator[str]:
    """A loopback proxy in front of ``upstream`` (host:port) that can fail, redirect or
    alter requests; yields its host:port. The Host header passes through unchanged, so
    the registry's Location headers point back at the proxy."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _relay_handler(upstream, hook, transform))
    with serving(server):
        yield f"127.0.0.1:{server.server_address[1]}"


@contextlib.contextmanager
def tampering_proxy(upstream: str) -> Iterator[tuple[str, list[str]]]:
    """A proxy that flips one byte in the middle of every blob it relays; yields its
    host:port and the blob paths it altered."""
    flipped: list[str] = []

    def flip(method: str, path: str, status: int, body: bytes) -> bytes:
        if method != "GET" or status != 200 or not BLOB_PATH.match(path) or not body:
            return body
        flipped.append(path)
        middle = len(body) // 2
        return body[:middle] + bytes([body[middle] ^ 0x01]) + body[middle + 1 :]

    with relay_proxy(upstream, transform=flip) as proxy:
        yield proxy, flipped
