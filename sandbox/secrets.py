"""Secrets that never enter a sandbox: their values, placeholders, CA and byte scanners.

A sandbox's spec names its secrets and the hosts each is bound to (spec.SecretBinding);
the values come beside the spec, in a `SecretSet` that lives only in the runtime's memory.
The rules this module keeps:

1. Inside, the variable NAME holds a placeholder: PLACEHOLDER_PREFIX and 32 random hex
   digits, new for every sandbox. It is lower case and 46 characters long, so it survives a
   DNS name (case-folded, 63 bytes a label) and a scanner finds it by its prefix.
2. The value is bytes in this object and nowhere else: not in the spec, the environment,
   the audit events (which name the secret), nor in `repr()`.
3. Each sandbox has its own CA (ECDSA P-256), made here; its key stays in this process
   (and, for a sandbox live restore keeps, in a sealed memfd the descriptor holder keeps:
   `kept_state`, sandbox/net.py). The CA is name-constrained to the bound hosts, so even
   its key could only vouch for them. Leaf certificates are made per server name on
   first use and cached.
4. `StreamRewriter` finds needles in a byte stream cut anywhere (a placeholder straddling
   two TCP segments, two TLS records or two body chunks): it holds back the last
   len(longest needle) - 1 bytes until more come or the stream ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import re
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .errors import InvalidSpec
from .spec import SecretBinding

PLACEHOLDER_PREFIX = "corral_secret_"
#: The shortest value a secret may have: scrubbing a response replaces every occurrence
#: of the value, which for a short one would be ordinary text.
MIN_VALUE_BYTES = 8
#: Where the sandbox's trust lives inside: the host's /etc/ssl/certs with the bundle
#: extended by the sandbox's CA (a directory bound read-only over the system one).
TRUST_DIR = "/etc/ssl/certs"
TRUST_BUNDLE = TRUST_DIR + "/ca-certificates.crt"
TRUST_CA_ONLY = TRUST_DIR + "/corral-sandbox-ca.crt"
#: How long a sandbox's CA and its leaf certificates are valid (a deep task may run days).
CERT_LIFETIME = datetime.timedelta(days=90)


class Exfiltration(Exception):
    """A placeholder (or value) met on its way to a destination it is not bound to."""

    def __init__(self, secret: str):
        super().__init__(f"the placeholder of secret {secret}")
        self.secret = secret


def new_placeholder() -> str:
    """A fresh placeholder: the prefix and 128 random bits, lower-case hex."""
    return PLACEHOLDER_PREFIX + os.urandom(16).hex()


def host_matches(pattern: str, host: str) -> bool:
    """Is host (canonical) covered by a binding's HOST or *.DOMAIN?"""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


@dataclass(frozen=True)
class BoundSecret:
    """One secret of one sandbox: its binding, placeholder and value (never repr'd)."""

    name: str
    hosts: tuple[str, ...]
    placeholder: bytes
    value: bytes = field(repr=False)

    def bound_to(self, host: str) -> bool:
        return any(host_matches(p, host) for p in self.hosts)


class StreamRewriter:
    """Replace needles in a stream cut anywhere; a forbidden needle raises Exfiltration.

    Args:
        replace: needle -> what goes out instead (matched case-sensitively).
        forbid: needle -> secret name (matched ignoring ASCII case: a placeholder
            upper-cased is still the placeholder).
    """

    def __init__(self, replace: Mapping[bytes, bytes], forbid: Mapping[bytes, str]):
        self._replace = dict(replace)
        self._forbid = {k.lower(): v for k, v in forbid.items()}
        needles = [*self._replace, *self._forbid]
        self._longest = max((len(n) for n in needles), default=1)
        self._find = re.compile(b"|".join(re.escape(n) for n in sorted(
            self._replace, key=len, reverse=True))) if self._replace else None
        self._carry = b""
        self.replaced = 0

    def feed(self, data: bytes) -> bytes:
        """What may go out now of what came so far (the rest is held back)."""
        buf = self._carry + bytes(data)
        if self._forbid:
            # bytes.lower() and `in` run at memory speed; an IGNORECASE regex is ~40x slower
            lowered = buf.lower()
            for needle, name in self._forbid.items():
                if needle in lowered:
                    self._carry = b""
                    raise Exfiltration(name)
        keep_from = max(len(buf) - (self._longest - 1), 0)
        if self._find is None:
            self._carry = buf[keep_from:]
            return buf[:keep_from]
        out, pos = [], 0
        for hit in self._find.finditer(buf):
            out.append(buf[pos:hit.start()])
            out.append(self._replace[hit.group()])
            pos = hit.end()
            self.replaced += 1
        keep_from = max(keep_from, pos)
        out.append(buf[pos:keep_from])
        self._carry = buf[keep_from:]
        return b"".join(out)

    def finish(self) -> bytes:
        """The held-back tail at the end of the stream (no needle can complete now)."""
        tail, self._carry = self._carry, b""
        return tail

    def whole(self, data: bytes) -> bytes:
        """Rewrite a complete piece (a header, a buffered body) on its own."""
        return self.feed(data) + self.finish()


class SecretSet:
    """The secrets of one sandbox: bindings, values, placeholders and its CA.

    Raises:
        InvalidSpec: on field "secrets": a bound secret has no value, or a too short one.
    """

    def __init__(self, bindings: Iterable[SecretBinding], values: Mapping[str, str | bytes]):
        secrets = []
        for binding in bindings:
            value = values.get(binding.name)
            if value is None:
                raise InvalidSpec("secrets", f"{binding.name} has no value (set it in the "
                                             "caller's environment or the secret store)")
            raw = value.encode() if isinstance(value, str) else bytes(value)
            if len(raw) < MIN_VALUE_BYTES or b"\0" in raw or b"\r" in raw or b"\n" in raw:
                raise InvalidSpec("secrets", f"{binding.name}: a value must be at least "
                                             f"{MIN_VALUE_BYTES} bytes, without NUL or line "
                                             "breaks")
            secrets.append(BoundSecret(binding.name, tuple(binding.hosts),
                                       new_placeholder().encode(), raw))
        self.secrets: tuple[BoundSecret, ...] = tuple(secrets)
        self._ca: SandboxCA | None = None

    def __repr__(self) -> str:
        return f"SecretSet({', '.join(s.name for s in self.secrets)})"

    def kept_state(self) -> dict:
        """What a restarted daemon needs to serve this set again (live restore): each
        placeholder (the sandbox's environment holds it) and the CA with its key (its
        trust directory holds the certificate). Never a value: those are read again."""
        return {"placeholders": {s.name: s.placeholder.decode() for s in self.secrets},
                "ca": [pem.decode() for pem in self.ca.kept_pem()]}

    @classmethod
    def restored(cls, bindings: Iterable[SecretBinding], values: Mapping[str, str | bytes],
                 state: Mapping) -> SecretSet:
        """The set a dead daemon served (its kept_state()) with values read again now:
        the same placeholders and CA, so what the sandbox holds stays true.

        Raises:
            InvalidSpec: on field "secrets": as __init__, or the state lacks a binding's
                placeholder or the CA.
        """
        made = cls(bindings, values)
        placeholders = state.get("placeholders")
        kept = []
        for secret in made.secrets:
            held = placeholders.get(secret.name) if isinstance(placeholders, dict) else None
            if not isinstance(held, str) or not re.fullmatch(
                    re.escape(PLACEHOLDER_PREFIX) + "[0-9a-f]{32}", held):
                raise InvalidSpec("secrets", f"{secret.name}: its placeholder was not kept")
            kept.append(dataclasses.replace(secret, placeholder=held.encode()))
        made.secrets = tuple(kept)
        try:
            cert_pem, key_pem = (pem.encode() for pem in state["ca"])
            made._ca = SandboxCA.from_pem(cert_pem, key_pem)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InvalidSpec("secrets", "the sandbox's CA was not kept whole") from None
        return made

    def __bool__(self) -> bool:
        return bool(self.secrets)

    @property
    def ca(self) -> SandboxCA:
        """The sandbox's CA, made on first use."""
        if self._ca is None:
            hosts = sorted({h for s in self.secrets for h in s.hosts})
            self._ca = SandboxCA(hosts)
        return self._ca

    def environment(self) -> dict[str, str]:
        """What the sandbox's commands get: NAME=placeholder, and the trust variables."""
        env = {s.name: s.placeholder.decode() for s in self.secrets}
        for key in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            env[key] = TRUST_BUNDLE
        env["NODE_EXTRA_CA_CERTS"] = TRUST_CA_ONLY
        return env

    def intercepts(self, host: str | None) -> bool:
        """Is some secret bound to host (so its TLS is terminated by the proxy)?"""
        return bool(host) and any(s.bound_to(host) for s in self.secrets)

    def placeholder_in(self, text: str | bytes) -> str | None:
        """The name of a secret whose placeholder occurs in text (any case), or None."""
        data = (text.encode("latin-1", "replace") if isinstance(text, str) else text).lower()
        return next((s.name for s in self.secrets if s.placeholder in data), None)

    def placeholder_in_name(self, name: str) -> str | None:
        """placeholder_in for a host name, also when it is split across labels."""
        return self.placeholder_in(name) or self.placeholder_in(name.replace(".", ""))

    def redact(self, text: str) -> str:
        """text with every value (as it would print) replaced by the secret's name: for
        error messages that quote what a peer sent."""
        for s in self.secrets:
            for form in (s.value.decode("latin-1"), repr(s.value)[2:-1]):
                text = text.replace(form, f"[secret {s.name}]")
        return text

    def outbound(self) -> StreamRewriter:
        """The scanner of a connection to a host no secret is bound to: any placeholder
        (or value, if a value ever were there) stops it."""
        forbid = {s.placeholder: s.name for s in self.secrets}
        return StreamRewriter({}, forbid)

    def request_rewriter(self, host: str) -> StreamRewriter:
        """Toward host: its secrets' placeholders become values, the others' are refused."""
        own = [s for s in self.secrets if s.bound_to(host)]
        forbid = {s.placeholder: s.name for s in self.secrets if s not in own}
        return StreamRewriter({s.placeholder: s.value for s in own}, forbid)

    def foreign_scanner(self, host: str) -> StreamRewriter:
        """Toward host, where nothing may be resized: the others' placeholders are refused,
        its own pass unchanged."""
        return StreamRewriter({}, {s.placeholder: s.name for s in self.secrets
                                   if not s.bound_to(host)})

    def response_scrubber(self, host: str) -> StreamRewriter:
        """From host: a value echoed back goes to the sandbox as its placeholder."""
        return StreamRewriter({s.value: s.placeholder for s in self.secrets
                               if s.bound_to(host)}, {})


class SandboxCA:
    """A per-sandbox CA, name-constrained to the bound hosts; leaf contexts per name."""

    def __init__(self, hosts: Iterable[str]):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corral sandbox CA"),
                             x509.NameAttribute(NameOID.SERIAL_NUMBER, os.urandom(8).hex())])
        permitted = [x509.DNSName(h[2:] if h.startswith("*.") else h) for h in hosts]
        public = key.public_key()
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.NameConstraints(permitted_subtrees=permitted or None,
                                                excluded_subtrees=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256()))
        self._hold(key, cert)

    def _hold(self, key, cert) -> None:
        from cryptography.hazmat.primitives import serialization

        self._key, self.cert = key, cert
        self._subject = cert.subject
        self._not_after = cert.not_valid_after_utc
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._contexts: dict[str, ssl.SSLContext] = {}

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes) -> SandboxCA:
        """The CA kept_pem() gave (live restore: a restarted daemon's copy of it).

        Raises:
            ValueError: the PEMs are not an EC key and the certificate of its public key.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or \
                cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise ValueError("the kept key is not the CA certificate's")
        ca = cls.__new__(cls)
        ca._hold(key, cert)
        return ca

    def kept_pem(self) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM, unencrypted): for the holder's sealed memfd only
        (sandbox/net.py kept_descriptors); never written to a file."""
        from cryptography.hazmat.primitives import serialization

        return self.cert_pem, self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    def __repr__(self) -> str:
        return "SandboxCA()"

    def server_context(self, name: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for name (made once, then cached)."""
        ctx = self._contexts.get(name)
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_alpn_protocols(["h2", "http/1.1"])  # h2: sandbox/intercept_h2.py
            ctx.num_tickets = 0  # sandboxes rarely resume; tickets would cost every handshake
            _load_chain(ctx, *self.leaf_pem(name))
            self._contexts[name] = ctx
        return ctx

    def leaf_pem(self, name: str) -> tuple[bytes, bytes]:
        """(certificate chain PEM, key PEM) of a leaf for one server name."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        try:
            san = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(self._not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem, key_pem


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """load_cert_chain from memory: ssl takes only paths, so the PEM goes through a memfd
    (anonymous memory, never a file on a disk)."""
    fd = os.memfd_create("corral-leaf", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def write_trust_dir(directory: str, ca_pem: bytes, system_dir: str = TRUST_DIR,
                    links_parent: str | None = None) -> None:
    """Fill directory with the host's trust (system_dir) plus the sandbox's CA, to be bound
    read-only over TRUST_DIR inside: the bundle extended by the CA, the CA alone, every
    link as it is (the directory is shown at the same path, so a link leads inside where
    it leads on the host: /usr/share, which the sandbox sees, or a sibling) and every
    other file copied. Subdirectories are left out.

    Args:
        links_parent: a directory on directory's filesystem where this process keeps one
            copy of the host's links (host_links) to hard-link from: a few hundred
            symlink() calls cost ~100 ms on a disk-backed /run, link() calls ~5 ms.
    """
    os.mkdir(directory, 0o755)
    bundle = os.path.basename(TRUST_BUNDLE)
    links = host_links(system_dir, links_parent) if links_parent else None
    for name in _entries(system_dir):
        source = os.path.join(system_dir, name)
        target = os.path.join(directory, name)
        try:
            if name == bundle:
                continue
            if os.path.islink(source):
                if links is None or not _hard_link(os.path.join(links, name), target):
                    os.symlink(os.readlink(source), target)
            elif os.path.isfile(source):
                with open(source, "rb") as f:
                    _write(target, f.read())
        except OSError:
            continue  # an entry that vanished or cannot be read: the bundle still works
    _write(os.path.join(directory, bundle), _system_bundle(system_dir) + ca_pem)
    _write(os.path.join(directory, os.path.basename(TRUST_CA_ONLY)), ca_pem)


def replace_trust_ca(directory: str, ca_pem: bytes, system_dir: str = TRUST_DIR) -> None:
    """Put another CA in a trust directory write_trust_dir made: the bundle (the host's
    plus ca_pem) and the CA alone are replaced whole, each by a rename in the directory,
    so a reader sees the old file or the new one. A warm pool's sandbox (runtime/pools.py)
    is born with a CA of its own that vouches for no real host; at acquire its directory,
    bound read-only over TRUST_DIR inside, gets the CA of the request's secrets, and then
    holds what a cold sandbox's holds."""
    for name, data in ((os.path.basename(TRUST_BUNDLE), _system_bundle(system_dir) + ca_pem),
                       (os.path.basename(TRUST_CA_ONLY), ca_pem)):
        target = os.path.join(directory, name)
        staged = os.path.join(directory, f".{name}.{os.urandom(4).hex()}")
        _write(staged, data)
        try:
            os.replace(staged, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise


def _system_bundle(system_dir: str) -> bytes:
    """The host's CA bundle, ending in a line break; b"" on a host without one (the
    sandbox then trusts its CA only)."""
    try:
        with open(os.path.join(system_dir, os.path.basename(TRUST_BUNDLE)), "rb") as f:
            data = f.read()
    except OSError:
        return b""
    return data if not data or data.endswith(b"\n") else data + b"\n"


def _entries(system_dir: str) -> list[str]:
    try:
        return sorted(os.listdir(system_dir))
    except OSError:
        return []


def _hard_link(source: str, target: str) -> bool:
    try:
        os.link(source, target, follow_symlinks=False)
        return True
    except OSError:
        return False  # not in the template (a link added since), or another filesystem


_links_made: dict[tuple[str, str], str] = {}
_links_lock = threading.Lock()
LINKS_PREFIX = "trust-links-"


def host_links(system_dir: str, parent: str) -> str | None:
    """This process's copy of system_dir's links, in parent (made on first use; those of
    processes that are gone are removed then). None when it cannot be made. Links the
    host adds later are made one by one by write_trust_dir."""
    with _links_lock:
        key = (system_dir, parent)
        if key in _links_made:
            return _links_made[key]
        path = os.path.join(parent, f"{LINKS_PREFIX}{os.getpid()}")
        try:
            _remove_stale_links(parent)
            if os.path.isdir(path):
                shutil.rmtree(path)  # an earlier process with this pid
            staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
            for name in _entries(system_dir):
                source = os.path.join(system_dir, name)
                if os.path.islink(source):
                    os.symlink(os.readlink(source), os.path.join(staging, name))
            os.rename(staging, path)
        except OSError:
            return None
        _links_made[key] = path
        return path


def _remove_stale_links(parent: str) -> None:
    for name in os.listdir(parent):
        pid = name.removeprefix(LINKS_PREFIX)
        if name.startswith(LINKS_PREFIX) and pid.isdigit() and int(pid) != os.getpid() \
                and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
