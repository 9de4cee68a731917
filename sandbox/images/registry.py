"""A client of the OCI distribution API: manifests and blobs over HTTP(S), and pushes.

`parse_registry_ref` reads `HOST[:PORT]/REPO[:TAG|@sha256:..]` (docker's default registry,
docker.io, when the first component is not a host). `RegistryClient` talks to one repository
of one registry: anonymous, Basic, or the Bearer token flow (a 401's WWW-Authenticate names a
realm, service and scope; the token from the realm is used and the request retried once),
with credentials read as docker reads them (`$DOCKER_CONFIG/config.json`, else
`~/.docker/config.json`: `auths`, `credHelpers`, `credsStore`). Plain HTTP only to loopback
registries and those named in `$CORRAL_INSECURE_REGISTRIES`; HTTPS with the system's CAs
otherwise. Every socket operation has a timeout. No credential is ever logged or put in an
error: messages say which source was tried, never what it held.

Nothing here trusts a digest either: the caller (sources.py, the store) hashes what comes.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from ..errors import CorralError, InvalidSpec, Unauthenticated
from .errors import ImageNotFound

#: Docker's default registry: what a name without a host means, and where it really is.
DEFAULT_REGISTRY = "docker.io"
_HUB_ENDPOINT = "registry-1.docker.io"
_HUB_CONFIG_KEY = "https://index.docker.io/v1/"
#: Seconds for each socket operation (connect, each read, each write).
TIMEOUT = 30.0
_MAX_REDIRECTS = 5
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^\w[\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


class RegistryError(CorralError):
    """A registry could not be reached or answered with an error."""

    grpc_status = "UNAVAILABLE"


class RegistryAuthError(Unauthenticated):
    """A registry refused the credentials (or their absence)."""


def looks_like_host(component: str) -> bool:
    """Whether a name's first path component is a registry host, as docker decides it."""
    return "." in component or ":" in component or component == "localhost"


@dataclass(frozen=True)
class RegistryRef:
    """One image of one repository: `host` as named (docker.io, localhost:5000)."""

    host: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def reference(self) -> str:
        """What a manifest is fetched by: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        tag = f":{self.tag}" if self.tag else ""
        return f"{self.host}/{self.repository}{tag}" + (f"@{self.digest}" if self.digest else "")


def parse_registry_ref(name: str) -> RegistryRef:
    """`HOST[:PORT]/REPO[:TAG][@sha256:HEX]`; without a host, docker.io (and library/ for a
    one-component name), as docker reads it.

    Raises:
        InvalidSpec: naming the part that is malformed.
    """
    rest, _, digest = name.partition("@")
    if digest and not _DIGEST.match(digest):
        raise InvalidSpec("image", f"{name!r}: digest {digest!r} is not sha256:<64 hex>")
    first, slash, tail = rest.partition("/")
    if slash and looks_like_host(first):
        host, path = first, tail
    else:
        host, path = DEFAULT_REGISTRY, rest
    repository, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = path[:len(path) - len(last)] + last.split(":", 1)[0], \
            last.split(":", 1)[1]
        if not _TAG.match(tag):
            raise InvalidSpec("image", f"{name!r}: tag {tag!r} is not a valid tag")
    if host == DEFAULT_REGISTRY and "/" not in repository:
        repository = "library/" + repository
    if not _REPOSITORY.match(repository):
        raise InvalidSpec("image", f"{name!r}: repository {repository!r} is not a valid "
                                   f"name (lowercase letters, digits, '.', '_', '-', '/')")
    if tag is None and not digest:
        tag = "latest"
    return RegistryRef(host, repository, tag, digest or None)


# -- where a registry is and whether plain HTTP may be used ------------------------------------


def _split_host(host: str) -> tuple[str, int | None]:
    if host.startswith("["):  # [::1]:5000
        addr, _, port = host[1:].partition("]")
        return addr, int(port[1:]) if port.startswith(":") else None
    addr, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return addr, int(port)
    return host, None


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (with or without a port)."""
    addr, _ = _split_host(host)
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def insecure_registries() -> set[str]:
    """Hosts the user allows plain HTTP to: `$CORRAL_INSECURE_REGISTRIES`, comma-separated."""
    raw = os.environ.get("CORRAL_INSECURE_REGISTRIES", "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def plain_http_allowed(host: str) -> bool:
    return is_loopback(host) or host in insecure_registries() \
        or _split_host(host)[0] in insecure_registries()


# -- credentials -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """A username and secret (a password, or an identity token for the token flow)."""

    username: str
    secret: str = field(repr=False)
    identity_token: bool
    #: Where it came from, for messages (never the secret itself).
    source: str


def docker_config_path() -> str:
    configured = os.environ.get("DOCKER_CONFIG")
    base = configured or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(base, "config.json")


def _config_host(key: str) -> str:
    """The host of an `auths`/`credHelpers` key (`https://index.docker.io/v1/` → docker.io)."""
    host = re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]
    return DEFAULT_REGISTRY if host in ("index.docker.io", _HUB_ENDPOINT) else host


def load_credential(host: str) -> tuple[Credential | None, str]:
    """The credential docker would use for HOST, and a description of what was looked at.

    Raises:
        RegistryAuthError: a credential helper failed (its name, never its output).
    """
    path = docker_config_path()
    try:
        with open(path, "rb") as f:
            config = json.load(f)
    except FileNotFoundError:
        return None, f"no credentials ({path} does not exist)"
    except ValueError as exc:
        raise InvalidSpec("docker config", f"{path} is not JSON: {exc}") from None
    helpers = {_config_host(k): v for k, v in (config.get("credHelpers") or {}).items()}
    if host in helpers:
        return _from_helper(helpers[host], host, f"credHelpers of {path}")
    for key, entry in (config.get("auths") or {}).items():
        if _config_host(key) == host and isinstance(entry, dict):
            found = _from_auths_entry(entry, f"auths[{key!r}] of {path}")
            if found is not None:
                return found, found.source
    if config.get("credsStore"):
        return _from_helper(config["credsStore"], host, f"credsStore of {path}")
    return None, f"no credentials for {host} in {path}"


def _from_auths_entry(entry: dict, source: str) -> Credential | None:
    if entry.get("identitytoken"):
        return Credential(entry.get("username") or "", entry["identitytoken"], True, source)
    if entry.get("auth"):
        try:
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise InvalidSpec("docker config", f"{source}: 'auth' is not base64 of "
                                               f"user:password") from None
        if not sep:
            raise InvalidSpec("docker config", f"{source}: 'auth' is not base64 of "
                                               f"user:password")
        return Credential(user, password, False, source)
    if entry.get("username") and entry.get("password"):
        return Credential(entry["username"], entry["password"], False, source)
    return None


def _from_helper(helper: str, host: str, where: str) -> tuple[Credential | None, str]:
    """Runs `docker-credential-HELPER get` with the server's URL on its stdin."""
    program = f"docker-credential-{helper}"
    source = f"{program} (from the {where})"
    exe = shutil.which(program)
    if exe is None:
        raise RegistryAuthError(f"registry {host}: the docker config names the credential "
                                f"helper {program}, which is not on PATH")
    server = _HUB_CONFIG_KEY if host == DEFAULT_REGISTRY else host
    try:
        proc = subprocess.run([exe, "get"], input=server.encode(), capture_output=True,
                              timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise RegistryAuthError(f"registry {host}: {program} did not answer in "
                                f"{TIMEOUT:g}s") from None
    if proc.returncode != 0:
        if b"credentials not found" in proc.stdout + proc.stderr:
            return None, f"no credentials for {host} in {source}"
        raise RegistryAuthError(f"registry {host}: {program} get failed (exit status "
                                f"{proc.returncode})")
    try:
        doc = json.loads(proc.stdout)
        user, secret = doc["Username"], doc["Secret"]
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(f"registry {host}: {program} get did not print "
                                f"{{Username, Secret}} JSON") from None
    token = user == "<token>"
    return Credential("" if token else user, secret, token, source), source


# -- HTTP --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Endpoint:
    scheme: str
    host: str  # host[:port] as it goes in the Host header and messages
    addr: str
    port: int

    @classmethod
    def of(cls, host: str, scheme: str | None = None) -> _Endpoint:
        scheme = scheme or ("http" if plain_http_allowed(host) else "https")
        addr, port = _split_host(host)
        return cls(scheme, host, addr, port or (80 if scheme == "http" else 443))


class BlobStream:
    """A response body being read; closing it closes its connection. Read errors are
    RegistryErrors (a cut connection is not a corrupt layer)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse,
                 what: str):
        self._conn, self._resp, self._what = conn, resp, what
        length = resp.getheader("Content-Length")
        self.length = int(length) if length and length.isdigit() else None

    def read(self, n: int = -1) -> bytes:
        try:
            return self._resp.read(n if n >= 0 else None)
        except (OSError, http.client.HTTPException) as exc:
            raise RegistryError(f"{self._what}: reading the body failed: "
                                f"{type(exc).__name__}: {exc}") from None

    def header(self, name: str) -> str:
        return self._resp.getheader(name) or ""

    def close(self) -> None:
        self._resp.close()
        self._conn.close()

    def __enter__(self) -> BlobStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


Body = bytes | Callable[[], BinaryIO] | None


class RegistryClient:
    """One repository of one registry; holds the token or Basic header it was given."""

    def __init__(self, ref: RegistryRef, *, timeout: float = TIMEOUT):
        self.ref = ref
        self.timeout = timeout
        endpoint_host = _HUB_ENDPOINT if ref.host == DEFAULT_REGISTRY else ref.host
        self.endpoint = _Endpoint.of(endpoint_host)
        self._authorization: str | None = None
        self._credential_loaded = False
        self._credential: Credential | None = None
        self._tried = "no credentials were looked up"

    # -- the API -------------------------------------------------------------------------------

    def manifest(self, reference: str, accept: tuple[str, ...]) -> tuple[bytes, str]:
        """The manifest (or index) REFERENCE names and its media type (Content-Type)."""
        path = f"/v2/{self.ref.repository}/manifests/{reference}"
        with self.request("GET", path, {"Accept": ", ".join(accept)}) as body:
            self._expect(body, (200,), f"manifest {reference}")
            data = body.read((4 << 20) + 1)
            if len(data) > 4 << 20:
                raise RegistryError(f"{self._where()}: manifest {reference} is larger than "
                                    f"4 MiB")
            media = body.header("Content-Type").split(";")[0].strip()
            return data, media

    def open_blob(self, digest: str) -> _Response:
        """The blob's bytes as a stream (redirects followed), not yet verified."""
        body = self.request("GET", f"/v2/{self.ref.repository}/blobs/{digest}")
        try:
            self._expect(body, (200,), f"blob {digest}")
        except BaseException:
            body.close()
            raise
        return body

    def blob_bytes(self, digest: str, limit: int) -> bytes:
        with self.open_blob(digest) as body:
            data = body.read(limit + 1)
        if len(data) > limit:
            raise RegistryError(f"{self._where()}: blob {digest} is larger than {limit} bytes")
        return data

    def push_blob(self, digest: str, size: int, body: Body) -> bool:
        """Uploads a blob unless the repository has it; True when it was uploaded."""
        with self.request("HEAD", f"/v2/{self.ref.repository}/blobs/{digest}") as head:
            if head.status == 200:
                return False
        with self.request("POST", f"/v2/{self.ref.repository}/blobs/uploads/", body=b"") as up:
            self._expect(up, (202,), f"upload of {digest}")
            location = up.header("Location")
        sep = "&" if "?" in location else "?"
        target = f"{location}{sep}digest={urllib.parse.quote(digest)}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with self.request("PUT", target, headers, body=body) as done:
            self._expect(done, (201,), f"upload of {digest}")
        return True

    def push_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        headers = {"Content-Type": media_type}
        with self.request("PUT", f"/v2/{self.ref.repository}/manifests/{reference}", headers,
                          body=data) as done:
            self._expect(done, (201,), f"manifest {reference}")

    # -- requests, redirects, authentication --------------------------------------------------

    def request(self, method: str, target: str, headers: dict | None = None,
                body: Body = None) -> _Response:
        """Sends one request; on a 401 authenticates (once) and sends it again; follows
        redirects of a GET or HEAD (without the Authorization header to another host)."""
        resp = self._send(self.endpoint, method, target, headers or {}, body, auth=True)
        if resp.status == 401:
            challenge = resp.header("WWW-Authenticate")
            resp.close()
            self._authenticate(challenge)
            resp = self._send(self.endpoint, method, target, headers or {}, body, auth=True)
            if resp.status == 401:
                resp.close()
                raise RegistryAuthError(f"{self._where()}: the registry refused the "
                                        f"credentials (401); tried {self._tried}")
        for _ in range(_MAX_REDIRECTS):
            if resp.status not in (301, 302, 303, 307, 308) or method not in ("GET", "HEAD"):
                return resp
            location = resp.header("Location")
            resp.close()
            endpoint, target = self._redirect(resp.endpoint, location)
            resp = self._send(endpoint, method, target, headers or {}, None,
                              auth=endpoint == self.endpoint)
        resp.close()
        raise RegistryError(f"{self._where()}: more than {_MAX_REDIRECTS} redirects")

    def _redirect(self, current: _Endpoint, location: str) -> tuple[_Endpoint, str]:
        url = urllib.parse.urlsplit(location)
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        if not url.netloc:
            return current, target
        if url.scheme not in ("http", "https"):
            raise RegistryError(f"{self._where()}: redirect to a {url.scheme or '?'} URL")
        if url.scheme == "http" and not plain_http_allowed(url.netloc):
            raise RegistryError(f"{self._where()}: redirect to plain http://{url.netloc}, "
                                f"which is neither loopback nor in "
                                f"CORRAL_INSECURE_REGISTRIES")
        return _Endpoint.of(url.netloc, url.scheme), target

    def _send(self, endpoint: _Endpoint, method: str, target: str, headers: dict, body: Body,
              *, auth: bool) -> _Response:
        conn = self._connect(endpoint)
        stream = body() if callable(body) else None
        try:
            hdrs = {"User-Agent": "corral", **headers}
            if auth and self._authorization:
                hdrs["Authorization"] = self._authorization
            conn.request(method, target, body=stream if stream is not None else body,
                         headers=hdrs)
            resp = conn.getresponse()
        except ConnectionRefusedError:
            conn.close()
            raise RegistryError(f"registry {endpoint.addr}:{endpoint.port}: connection "
                                f"refused ({endpoint.scheme})") from None
        except ssl.SSLError as exc:
            conn.close()
            hint = ("a registry without TLS may be named in CORRAL_INSECURE_REGISTRIES"
                    if exc.reason == "WRONG_VERSION_NUMBER" else
                    "its certificate must verify against the system's CAs (or those "
                    "SSL_CERT_FILE names)")
            raise RegistryError(f"registry {endpoint.host}: TLS failed ({exc.reason or exc}); "
                                f"{hint}") from None
        except socket.gaierror as exc:
            conn.close()
            raise RegistryError(f"registry {endpoint.host}: the name does not resolve "
                                f"({exc.strerror})") from None
        except TimeoutError:
            conn.close()
            raise RegistryError(f"registry {endpoint.host}: no answer in "
                                f"{self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise RegistryError(f"registry {endpoint.host} ({endpoint.scheme}): "
                                f"{type(exc).__name__}: {exc}") from None
        finally:
            if stream is not None:
                stream.close()
        return _Response(conn, resp, f"{self._where()}: {method} {target.split('?')[0]}",
                         endpoint)

    def _connect(self, endpoint: _Endpoint) -> http.client.HTTPConnection:
        if endpoint.scheme == "http":
            return http.client.HTTPConnection(endpoint.addr, endpoint.port,
                                              timeout=self.timeout)
        return http.client.HTTPSConnection(endpoint.addr, endpoint.port, timeout=self.timeout,
                                           context=ssl.create_default_context())

    def _credential_for_host(self) -> Credential | None:
        if not self._credential_loaded:
            self._credential, self._tried = load_credential(self.ref.host)
            self._credential_loaded = True
        return self._credential

    def _authenticate(self, challenge: str) -> None:
        scheme, _, params_text = challenge.partition(" ")
        params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
                  for m in _CHALLENGE_PARAM.finditer(params_text)}
        credential = self._credential_for_host()
        if scheme.lower() == "basic":
            if credential is None or credential.identity_token:
                raise RegistryAuthError(f"{self._where()}: the registry needs a username and "
                                        f"password (401, Basic); {self._tried}")
            self._authorization = _basic(credential)
        elif scheme.lower() == "bearer" and params.get("realm"):
            self._authorization = "Bearer " + self._token(params, credential)
        else:
            raise RegistryAuthError(f"{self._where()}: 401 with an authentication scheme "
                                    f"this client does not speak ({scheme or 'none'})")

    def _token(self, params: dict, credential: Credential | None) -> str:
        """A token from the challenge's realm (GET with Basic, or the identity token's
        refresh grant as a POST form)."""
        realm = urllib.parse.urlsplit(params["realm"])
        if realm.scheme not in ("http", "https") or not realm.netloc or (
                realm.scheme == "http" and not plain_http_allowed(realm.netloc)):
            raise RegistryAuthError(f"{self._where()}: the token realm {params['realm']!r} is "
                                    f"not an https URL (or a loopback/insecure http one)")
        scope = params.get("scope") or f"repository:{self.ref.repository}:pull"
        query = {"service": params.get("service", ""), "scope": scope}
        endpoint = _Endpoint.of(realm.netloc, realm.scheme)
        headers: dict[str, str] = {}
        if credential is not None and credential.identity_token:
            form = urllib.parse.urlencode({**query, "grant_type": "refresh_token",
                                           "refresh_token": credential.secret,
                                           "client_id": "corral"}).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            method, target, body = "POST", realm.path or "/", form
        else:
            if credential is not None:
                headers["Authorization"] = _basic(credential)
            sep = "&" if realm.query else ""
            target = f"{realm.path or '/'}?{realm.query}{sep}{urllib.parse.urlencode(query)}"
            method, body = "GET", None
        with self._send(endpoint, method, target, headers, body, auth=False) as resp:
            if resp.status in (401, 403):
                raise RegistryAuthError(f"{self._where()}: the token service "
                                        f"{realm.netloc} refused ({resp.status}); tried "
                                        f"{self._tried}")
            self._expect(resp, (200,), "token")
            try:
                doc = json.loads(resp.read(1 << 20))
                return str(doc.get("token") or doc["access_token"])
            except (ValueError, KeyError, TypeError, AttributeError):
                raise RegistryAuthError(f"{self._where()}: the token service {realm.netloc} "
                                        f"answered without a token") from None

    # -- errors --------------------------------------------------------------------------------

    def _where(self) -> str:
        return f"registry {self.ref.host}, repository {self.ref.repository}"

    def _expect(self, resp: _Response, ok: tuple[int, ...], what: str) -> None:
        if resp.status in ok:
            return
        detail = _error_detail(resp)
        if resp.status == 404:
            raise ImageNotFound(f"{self._where()}: no {what} (404{detail})")
        if resp.status in (401, 403):
            raise RegistryAuthError(f"{self._where()}: {what}: access denied ({resp.status}"
                                    f"{detail}); tried {self._tried}")
        raise RegistryError(f"{self._where()}: {what}: HTTP {resp.status} {resp.reason}"
                            f"{detail}")


class _Response(BlobStream):
    def __init__(self, conn, resp, what: str, endpoint: _Endpoint):
        super().__init__(conn, resp, what)
        self.status = resp.status
        self.reason = resp.reason
        self.endpoint = endpoint


def _basic(credential: Credential) -> str:
    pair = f"{credential.username}:{credential.secret}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _error_detail(resp: _Response) -> str:
    """The distribution API's error codes of a response (`MANIFEST_UNKNOWN`...), if any."""
    with contextlib.suppress(RegistryError, ValueError, AttributeError, TypeError):
        doc = json.loads(resp.read(64 << 10) or b"{}")
        codes = [str(e.get("code")) for e in doc.get("errors") or [] if e.get("code")]
        if codes:
            return ": " + ", ".join(codes)
    return ""
