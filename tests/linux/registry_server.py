"""Registries for the registry tests and bench/images.py: Debian's `docker-registry` on
127.0.0.1 (storage in a temp directory, optional htpasswd auth), a Bearer token front for it,
and pushing built layers, manifests and indexes with Corral's own client."""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import os
import secrets
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator

from corral.sandbox.images.registry import RegistryClient, parse_registry_ref

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for an htpasswd file (the registry reads only bcrypt), from libxcrypt
    through the crypt module (no bcrypt package or htpasswd tool here); cost 4 keeps it fast."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt
    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    if not hashed or not hashed.startswith("$2"):
        raise RuntimeError("this libc's crypt() makes no bcrypt hashes")
    return hashed


@contextlib.contextmanager
def docker_registry(workdir: str, *, users: dict[str, str] | None = None) -> Iterator[str]:
    """A `docker-registry serve` on 127.0.0.1:<free port> storing under WORKDIR; yields
    its HOST:PORT and stops it (and waits for it) on every path."""
    port = free_port()
    storage = os.path.join(workdir, "storage")
    os.makedirs(storage, exist_ok=True)
    auth = ""
    if users:
        htpasswd = os.path.join(workdir, "htpasswd")
        with open(htpasswd, "w") as f:
            f.writelines(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in users.items())
        auth = f"auth:\n  htpasswd:\n    realm: corral-test\n    path: {htpasswd}\n"
    config = os.path.join(workdir, "config.yml")
    with open(config, "w") as f:
        f.write("version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: 127.0.0.1:{port}\n" + auth)
    log = open(os.path.join(workdir, "registry.log"), "wb")
    proc = subprocess.Popen(["docker-registry", "serve", config], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(proc, port, os.path.join(workdir, "registry.log"))
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _wait_ready(proc: subprocess.Popen, port: int, log_path: str) -> None:
    for _ in range(200):  # bounded: 10 s
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"docker-registry exited {proc.returncode}: {f.read()}")
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                conn.request("GET", "/v2/")
                if conn.getresponse().status in (200, 401):
                    return
            finally:
                conn.close()
        time.sleep(0.05)
    raise RuntimeError("docker-registry did not answer on /v2/ in 10 s")


def blob_file(workdir: str, digest: str) -> str:
    """Where the registry's filesystem driver keeps a blob's bytes."""
    hex_ = digest.removeprefix("sha256:")
    return os.path.join(workdir, "storage", "docker", "registry", "v2", "blobs", "sha256",
                        hex_[:2], hex_, "data")


def push_manifest_with_blobs(dest: str, blobs: list[bytes], manifest: dict,
                             media_type: str, tag: str | None = None) -> str:
    """Uploads BLOBS and then MANIFEST (to TAG, else by its own digest); returns the
    manifest's digest."""
    client = RegistryClient(parse_registry_ref(dest))
    for blob in blobs:
        client.push_blob(digest(blob), len(blob), blob)
    data = json.dumps(manifest).encode()
    client.push_manifest(tag or digest(data), data, media_type)
    return digest(data)


def digest(data: bytes) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(data).hexdigest()


class TokenFront:
    """A Bearer-token registry front on 127.0.0.1: /v2/ requests need a token it issued
    (else 401 with a Bearer challenge naming its /token realm); /token issues one for a
    good Basic username/password (GET) or for its refresh token (POST, grant_type
    refresh_token, as docker's identity tokens are used). Blob GETs are redirected to
    localhost:PORT/direct/... (another host name, as a registry redirects to its storage),
    served without a token.
    Everything else is forwarded to the anonymous registry behind it. With `tls_dir`, the
    token realm is https://localhost:PORT/token, a second listener with a self-signed
    certificate made there (cert.pem) by openssl."""

    def __init__(self, backend: str, user: str, password: str, refresh_token: str = "",
                 tls_dir: str | None = None):
        self.backend = backend
        self.refresh_token = refresh_token
        self.basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.tokens: set[str] = set()
        self.token_requests: list[dict] = []
        self.direct_auth: list[str | None] = []
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.realm = f"http://{self.host}/token"
        self.servers = [self.server]
        if tls_dir is not None:
            tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
            tls.socket = _tls_context(tls_dir).wrap_socket(tls.socket, server_side=True)
            self.realm = f"https://localhost:{tls.server_address[1]}/token"
            self.servers.append(tls)
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True)
                         for s in self.servers]

    def __enter__(self) -> TokenFront:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for server, thread in zip(self.servers, self._threads, strict=True):
            server.shutdown()
            server.server_close()
            thread.join()

    def _handler(self):
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_POST(self) -> None:
                from urllib.parse import parse_qs
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                front.token_requests.append(form)
                good = (form.get("grant_type") == "refresh_token" and front.refresh_token
                        and form.get("refresh_token") == front.refresh_token)
                front._issue(self, bool(good))

            def do_GET(self) -> None:
                if self.path.startswith("/token"):
                    return front._token(self)
                if self.path.startswith("/direct/"):
                    front.direct_auth.append(self.headers.get("Authorization"))
                    return front._forward(self, self.path[len("/direct"):])
                auth = self.headers.get("Authorization") or ""
                if auth.removeprefix("Bearer ") not in front.tokens:
                    repo = self.path.split("/")[2] if self.path.count("/") > 2 else ""
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", f'Bearer realm="{front.realm}'
                                     f'",service="corral-test",scope="repository:{repo}'
                                     f':pull"')
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if "/blobs/" in self.path:
                    self.send_response(307)
                    self.send_header("Location",
                                     f"http://localhost:{front.port}/direct{self.path}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                return front._forward(self, self.path)

        return Handler

    def _token(self, handler) -> None:
        from urllib.parse import parse_qs, urlsplit
        query = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
        self.token_requests.append(query)
        self._issue(handler, handler.headers.get("Authorization") == self.basic)

    def _issue(self, handler, good: bool) -> None:
        if not good:
            handler.send_response(401)
            handler.send_header("Content-Length", "0")
            return handler.end_headers()
        token = secrets.token_hex(16)
        self.tokens.add(token)
        body = json.dumps({"token": token}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _forward(self, handler, path: str) -> None:
        host, port = self.backend.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            headers = {k: v for k, v in handler.headers.items()
                       if k.lower() in ("accept", "range")}
            conn.request(handler.command, path, headers=headers)
            resp = conn.getresponse()
            handler.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() in ("content-type", "content-length", "docker-content-digest"):
                    handler.send_header(key, value)
            handler.end_headers()
            while chunk := resp.read(1 << 16):
                handler.wfile.write(chunk)
        finally:
            conn.close()


def _tls_context(tls_dir: str):
    """A server context with a fresh self-signed certificate for localhost (TLS_DIR/cert.pem
    is what a client must trust)."""
    import ssl
    os.makedirs(tls_dir, exist_ok=True)
    cert, key = os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context
