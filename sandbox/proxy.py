"""The egress proxy: policy rules, the per-connection decision, and the asyncio server.

Every TCP connection and UDP datagram a sandbox sends ends here (sandbox/net.py steers
them with BPF sk_lookup); nothing else leaves a sandbox. The rules this file keeps:

1. Deny by default. A connection is allowed by exactly one of:
   * a **name rule** (`example.com`, `*.example.com`, with an optional `:PORT`) matching
     the name the client asked for -- the CONNECT target, the absolute URI of a plain
     HTTP request, or, for transparently steered connections, the TLS SNI or HTTP Host
     (and, when the first bytes name nothing -- a raw protocol -- the allowed name the
     sandbox's resolver gave it this address for: DNS pinning);
   * an **address rule** (`203.0.113.7`, `10.0.0.0/8`, with an optional `:PORT`) matching
     the destination address.
2. A name is only as good as its addresses. The proxy resolves allowed names itself. An
   explicit request connects to the first resolved address that passes rule 3. A
   transparent connection keeps the destination the client chose, and that address must
   be one the name resolves to: an allowed Host header or SNI sent to another address
   (a forged Host) is denied.
3. Non-public addresses (loopback, link-local incl. 169.254.169.254, private, shared,
   reserved, multicast -- anything `ipaddress` does not call global) are denied even when
   an allowed name resolves to them, unless an address rule names them or the operator
   declared them routable (`EgressConfig.routable`, e.g. a corporate model endpoint).
4. Protected endpoints (the daemon's own ports, the egress link itself) are denied
   whatever the rules say, and so is every address outside `EgressConfig.upstream_only`
   when the operator set it.
4a. This host is not a destination by accident. An address is judged as what Linux
   connects it to: the unspecified addresses (0.0.0.0/8, ::) as loopback, an IPv4-mapped
   IPv6 address as its IPv4 address. A destination on this host -- loopback, or one of
   the host's own addresses (its local route) -- is reached only through an address rule
   that names it: a rule inside 127.0.0.0/8 for loopback, the single address (/32)
   otherwise. A wide rule (0.0.0.0/0, 10.0.0.0/8) or an operator's routable range never
   leads to the host's own listeners. After connecting, the proxy checks the socket's
   real peer against the decision again (same address, not protected, not this host
   unless named), so no rewrite on the way reaches what the decision refused.
5. UDP is dropped, except DNS to the proxy's resolver (GATEWAY:53), which answers A
   queries for allowed names (with the addresses rule 3 lets through) and NXDOMAIN for
   everything else. AAAA gets an empty answer: sandboxes have no IPv6 route.
5a. Secrets (sandbox/secrets.py, sandbox/intercept.py). A sandbox given secrets has every
   name it asks for (CONNECT or URI host, SNI, Host, DNS query) and every byte it sends
   scanned for its placeholders: one met toward anything but a host its secret is bound
   to stops the attempt before it is resolved or forwarded, and is reported as a
   `net.secret` event (action `blocked-exfiltration`, the secret's name, never a value).
   A connection to a bound name on port 443 is intercepted: TLS is terminated with the
   sandbox's CA and HTTP rewritten (placeholder -> value out, value -> placeholder back).
   Everything else keeps today's pass-through; ciphertext to another host is scanned but
   cannot be read (a placeholder inside it reaches that host as a placeholder, no more).
6. Every attempt is an event (allowed or denied; destination, bytes, duration), handed
   to the callback the sandbox was registered with; allowed connections report when they
   end. Events are rate-limited per sandbox (EVENT_RATE, EVENT_BURST; UDP denials capped
   at MAX_UDP_DENIAL_EVENTS) and so are open connections (MAX_CONNECTIONS); what is not
   reported is counted in the final `net.summary` event.

Pure parts (rules, decisions, TLS/HTTP/DNS parsing) have no I/O and are unit-tested;
`EgressProxy` runs them on its own event loop thread, shared by every sandbox of the
process (the CLI's one sandbox, or all of the daemon's).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .errors import FailedPrecondition, InvalidSpec
from .secrets import Exfiltration

GATEWAY = "100.127.255.1"  # same as net.GATEWAY (kept import-free of pyroute2/net)
PROXY_PORT = 3128
DNS_PORT = 53
LINK_NET = ipaddress.ip_network("100.127.255.0/30")

_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")

# -- rules ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetRule:
    """One --allow-net entry: a name, a *.wildcard, or an address/CIDR; port None = any."""

    kind: str  # "name" | "wildcard" | "address"
    name: str = ""  # lower-case; for a wildcard the suffix after "*."
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.kind == "address":
            host = str(self.network.network_address) if self.network.num_addresses == 1 \
                else str(self.network)
            if self.network.version == 6:
                host = f"[{host}]"
        else:
            host = ("*." if self.kind == "wildcard" else "") + self.name
        return host if self.port is None else f"{host}:{self.port}"

    def matches_name(self, name: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.kind == "name":
            return name == self.name
        if self.kind == "wildcard":
            return name.endswith("." + self.name)
        return False

    def matches_address(self, address, port: int) -> bool:
        if self.kind != "address" or (self.port is not None and self.port != port):
            return False
        return address.version == self.network.version and address in self.network


def _port(text: str, rule: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InvalidSpec("allow_net", f"{rule!r}: port {text!r} is not 1-65535")
    return int(text)


def normalize_name(name: str) -> str | None:
    """A host name in canonical form (lower case, no trailing dot), None if it is not one."""
    name = name.strip().lower().rstrip(".")
    if not name or len(name) > 253:
        return None
    if not all(_LABEL_RE.match(label) for label in name.split(".")):
        return None
    return name


def parse_rule(text: str) -> NetRule:
    """Parse HOST[:PORT], *.DOMAIN[:PORT], IP[:PORT], CIDR[:PORT] or [IPV6](/LEN)?[:PORT].

    Raises:
        InvalidSpec: on field "allow_net", naming the rule and what is wrong with it.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidSpec("allow_net", "an empty rule; use HOST[:PORT], *.DOMAIN, IP or CIDR")
    raw = text.strip()
    port = None
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep:
            raise InvalidSpec("allow_net", f"{text!r}: missing ']'")
        if rest:
            if not rest.startswith(":"):
                raise InvalidSpec("allow_net", f"{text!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], text)
    elif raw.count(":") > 1:
        host = raw  # a bare IPv6 address or network, no port
    else:
        host, sep, port_text = raw.rpartition(":")
        if sep:
            port = _port(port_text, text)
        else:
            host = raw
    try:
        network = ipaddress.ip_network(host, strict=True)
    except ValueError as exc:
        if "/" in host or host.replace(".", "").isdigit() or ":" in host:
            raise InvalidSpec("allow_net", f"{text!r}: not an address or network ({exc})") \
                from None
        network = None
    if network is not None:
        if network.version != 4:
            raise InvalidSpec("allow_net", f"{text!r}: IPv6 egress is not supported (sandboxes "
                                           "get an IPv4 link only)")
        return NetRule("address", network=network, port=port)
    wildcard = host.startswith("*.")
    name = normalize_name(host[2:] if wildcard else host)
    if name is None or "*" in host[2 if wildcard else 0:]:
        raise InvalidSpec("allow_net", f"{text!r}: not a host name, *.domain, IP or CIDR")
    return NetRule("wildcard" if wildcard else "name", name=name, port=port)


# -- decisions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    address: str = ""  # where the proxy connects (allowed) or what was refused
    rule: str = ""


@dataclass
class EgressConfig:
    """Process-wide settings of the proxy (operator knobs, not sandbox policy).

    hosts: name -> addresses, consulted before DNS (an /etc/hosts for the proxy; tests
        use it to name the servers of their own "internet").
    routable: non-public networks that name rules may reach (rule 3).
    protected: (address, port) pairs nobody may reach; address "" = any address.
    upstream_only: when set, the only networks the proxy ever connects to, whatever any
        rule allows (defence in depth for operators; the tests confine it to their own
        namespaces so that even a policy bug could not send a packet elsewhere).
    """

    hosts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    routable: tuple = ()
    upstream_only: tuple = ()
    protected: set[tuple[str, int]] = field(default_factory=set)
    #: Is this address one of this host's own (rule 4a)? The proxy asks the kernel's
    #: routing table (`host_local`); None = only loopback counts (pure unit tests).
    is_local: Callable[[object], bool] | None = None
    #: CA bundle that intercepted connections verify their servers with; None = the
    #: system store. Verification is never off.
    upstream_ca_file: str | None = None
    _upstream_tls: object = field(default=None, repr=False, compare=False)

    def upstream_tls_context(self):
        """The client TLS context of intercepted connections (made once)."""
        if self._upstream_tls is None:
            import ssl

            ctx = ssl.create_default_context(cafile=self.upstream_ca_file)
            ctx.set_alpn_protocols(["http/1.1"])
            self._upstream_tls = ctx
        return self._upstream_tls

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EgressConfig:
        """CORRAL_EGRESS_HOSTS (a hosts-format file), CORRAL_EGRESS_ROUTABLE and
        CORRAL_EGRESS_UPSTREAM_ONLY (CIDRs, comma separated), CORRAL_EGRESS_UPSTREAM_CA
        (the CA bundle intercepted connections verify servers with)."""
        env = os.environ if environ is None else environ
        cfg = cls()
        path = env.get("CORRAL_EGRESS_HOSTS")
        if path:
            with open(path) as f:
                cfg.hosts = parse_hosts(f.read())
        cfg.routable = _networks(env, "CORRAL_EGRESS_ROUTABLE")
        cfg.upstream_only = _networks(env, "CORRAL_EGRESS_UPSTREAM_ONLY")
        cfg.is_local = HostLocalCache()
        cfg.upstream_ca_file = env.get("CORRAL_EGRESS_UPSTREAM_CA") or None
        return cfg


def _networks(env: Mapping[str, str], name: str) -> tuple:
    nets = []
    for item in filter(None, (x.strip() for x in env.get(name, "").split(","))):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise InvalidSpec(name, f"{item!r} is not a network") from None
    return tuple(nets)


def parse_hosts(text: str) -> dict[str, tuple[str, ...]]:
    """hosts-file text -> {name: (address, ...)} in file order (IPv4 only)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            addr = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        if addr.version != 4:
            continue
        for name in fields[1:]:
            norm = normalize_name(name)
            if norm:
                out.setdefault(norm, []).append(str(addr))
    return {k: tuple(v) for k, v in out.items()}


_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.ip_network("::1/128")
_ZERO_NET = ipaddress.ip_network("0.0.0.0/8")
_LOOPBACK_ADDRESS = ipaddress.ip_address("127.0.0.1")


def judged_address(address):
    """The address a destination is judged as: where Linux really connects it.

    0.0.0.0/8 -> 127.0.0.1 and :: -> ::1 (connect() to an unspecified address reaches the
    local host); ::ffff:a.b.c.d -> a.b.c.d.
    """
    if not isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        address = ipaddress.ip_address(address)
    if address.version == 6:
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        elif address.is_unspecified:
            return ipaddress.ip_address("::1")
    if address.version == 4 and address in _ZERO_NET:
        return _LOOPBACK_ADDRESS
    return address


def host_local(address) -> bool:
    """Is address one of this host's own (a `local` route)? Asked of the kernel by a UDP
    connect(), which sends nothing: for a local address the source it picks is the
    address itself."""
    address = judged_address(address)
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as probe:
            probe.connect((str(address), 9))
            return ipaddress.ip_address(probe.getsockname()[0]) == address
    except OSError:
        return False  # no route at all: not this host


class HostLocalCache:
    """host_local() answers kept for TTL_S seconds (a decision asks several times per
    connection). A host address added meanwhile is still caught: the connected peer is
    judged again after connect (rule 4a)."""

    TTL_S = 2.0
    MAX_ENTRIES = 4096

    def __init__(self):
        self._seen: dict[object, tuple[float, bool]] = {}

    def __call__(self, address) -> bool:
        now = time.monotonic()
        hit = self._seen.get(address)
        if hit is not None and hit[0] > now:
            return hit[1]
        if len(self._seen) >= self.MAX_ENTRIES:
            self._seen.clear()
        local = host_local(address)
        self._seen[address] = (now + self.TTL_S, local)
        return local


def _names_host_address(network, address) -> bool:
    """Does a rule's (or routable) network name a host-local address explicitly?"""
    if address.is_loopback:
        loop = _LOOPBACK_V4 if address.version == 4 else _LOOPBACK_V6
        return network.version == address.version and network.subnet_of(loop)
    return network.num_addresses == 1


class EgressPolicy:
    """A sandbox's rules plus the process's config: the pure decision functions."""

    def __init__(self, rules: Iterable[NetRule | str], config: EgressConfig | None = None):
        self.rules = tuple(r if isinstance(r, NetRule) else parse_rule(r) for r in rules)
        self.config = config or EgressConfig()

    def name_rule(self, name: str | None, port: int) -> NetRule | None:
        if not name:
            return None
        return next((r for r in self.rules if r.matches_name(name, port)), None)

    def name_allowed(self, name: str) -> bool:
        """Is some name rule (any port) matching name? (What the resolver answers.)"""
        return any(r.kind != "address" and r.matches_name(name, r.port or 0)
                   for r in self.rules)

    def is_host_local(self, address) -> bool:
        """Is the (judged) address this host's own: loopback or a local route (rule 4a)?"""
        address = judged_address(address)
        return address.is_loopback or bool(self.config.is_local and
                                           self.config.is_local(address))

    def address_rule(self, address, port: int | None) -> NetRule | None:
        """The address rule allowing address:port (any port when port is None); a host-local
        address needs a rule that names it (rule 4a)."""
        address = judged_address(address)
        local = self.is_host_local(address)
        for r in self.rules:
            if r.kind != "address" or (port is not None and r.port not in (None, port)):
                continue
            if address.version == r.network.version and address in r.network and (
                    not local or _names_host_address(r.network, address)):
                return r
        return None

    def protected(self, address, port: int) -> bool:
        address = judged_address(address)
        if address in LINK_NET:
            return True
        for host, p in self.config.protected:
            if p != port:
                continue
            if not host:
                return True
            known = ipaddress.ip_address(host)
            if known.is_unspecified or judged_address(known) == address or (
                    address.is_loopback and judged_address(known).is_loopback):
                return True
        return False

    def _reachable(self, address, port: int | None) -> str | None:
        """Why a name rule may not lead to address (rule 3 and 4a), or None."""
        address = judged_address(address)
        local = self.is_host_local(address)
        if not local and address.is_global and not address.is_multicast:
            return None
        if any(address.version == net.version and address in net and (
                not local or _names_host_address(net, address))
               for net in self.config.routable):
            return None
        if self.address_rule(address, port):
            return None
        if local and not address.is_loopback:
            return f"{address} is an address of this host"
        return f"{address} is a non-public address ({_kind(address)})"

    def peer_refusal(self, requested: str, peer: str, local: str, port: int) -> str | None:
        """Why an established upstream connection must be dropped, or None (rule 4a).

        Args:
            requested: the address the decision allowed (and the proxy connected to).
            peer, local: the socket's getpeername() and getsockname() addresses.
        """
        want, got = judged_address(requested), judged_address(peer)
        if want != got:
            return f"connected to {peer}, not {requested}"
        if self.protected(got, port):
            return f"{peer}:{port} is a protected endpoint"
        if ipaddress.ip_address(local) == ipaddress.ip_address(peer) or got.is_loopback:
            # delivered on this host: only an address rule naming it may lead here
            rule = self.address_rule(got, port)
            if rule is None or not _names_host_address(rule.network, got):
                return f"{peer} is an address of this host"
        return None

    def decide(self, port: int, *, name: str | None = None, dst: str | None = None,
               resolved: Iterable[str] = ()) -> Decision:
        """The decision for one connection attempt.

        Args:
            name: the name asked for (CONNECT/URI host, SNI or Host), if any.
            dst: the destination the client chose (transparent) or an IP literal it asked
                for; None when the proxy picks the address (explicit request by name).
            resolved: the addresses `name` resolves to.
        """
        if dst is not None:
            dst = str(judged_address(dst))
        decision = self._decide(port, name, dst, resolved)
        limit = self.config.upstream_only
        if decision.allowed and limit and not any(
                judged_address(decision.address) in net for net in limit):
            return Decision(False, f"{decision.address} is outside the operator's upstream "
                                   "networks", decision.address, decision.rule)
        return decision

    def _decide(self, port, name, dst, resolved) -> Decision:
        dst_addr = None
        if dst is not None:
            dst_addr = ipaddress.ip_address(dst)
            if self.protected(dst_addr, port):
                return Decision(False, f"{dst}:{port} is a protected endpoint", dst)
            rule = self.address_rule(dst_addr, port)
            if rule is not None:
                return Decision(True, "address rule", dst, str(rule))
        if name is None:
            what = f"{dst}:{port}" if dst else f"port {port}"
            return Decision(False, f"no rule allows {what}", dst or "")
        rule = self.name_rule(name, port)
        if rule is None:
            return Decision(False, f"no rule allows {name}:{port}", dst or "")
        addresses = list(dict.fromkeys(resolved))
        if not addresses:
            return Decision(False, f"{name} does not resolve", dst or "", str(rule))
        if dst is not None:
            if dst not in addresses:
                return Decision(False, f"{dst} is not an address of {name} (forged name)",
                                dst, str(rule))
            candidates = [dst]
        else:
            # judged as what connect() would reach (0.0.0.0 is this host's loopback)
            candidates = list(dict.fromkeys(str(judged_address(a)) for a in addresses))
        reasons = []
        for cand in candidates:
            addr = ipaddress.ip_address(cand)
            if self.protected(addr, port):
                reasons.append(f"{cand}:{port} is a protected endpoint")
                continue
            why = self._reachable(addr, port)
            if why is None:
                return Decision(True, "name rule", cand, str(rule))
            reasons.append(why)
        return Decision(False, reasons[0], candidates[0], str(rule))

    def dns_answers(self, name: str, resolved: Iterable[str]) -> list[str]:
        """The A records the resolver gives for an allowed name (rule 3 applied)."""
        out = []
        for cand in resolved:
            addr = ipaddress.ip_address(cand)
            if addr.version != 4 or self.protected(addr, 0):
                continue
            if self._reachable(addr, None) is None:
                out.append(cand)
        return out


def _kind(address) -> str:
    for attr, word in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                       ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                       ("is_private", "private"), ("is_reserved", "reserved")):
        if getattr(address, attr):
            return word
    return "not global"


# -- sniffing: TLS ClientHello SNI, HTTP request head ---------------------------------------------

NEED_MORE = object()
MAX_HEAD = 64 * 1024


def parse_sni(data: bytes):
    """The SNI host name of a TLS ClientHello; NEED_MORE if incomplete; None if absent
    or not TLS."""
    if len(data) < 5:
        return NEED_MORE if (not data or data[0] == 0x16) else None
    if data[0] != 0x16 or data[1] != 0x03:
        return None
    rec_len = struct.unpack_from("!H", data, 3)[0]
    body = data[5:5 + rec_len]
    if len(body) < 4:
        return NEED_MORE
    if body[0] != 0x01:
        return None
    hs_len = int.from_bytes(body[1:4], "big")
    if hs_len > len(body) - 4:
        # a ClientHello split over several records: reassemble the handshake bytes
        hs, pos = bytearray(body[4:]), 5 + rec_len
        while len(hs) < hs_len:
            if len(data) < pos + 5:
                return NEED_MORE if len(data) < MAX_HEAD else None
            if data[pos] != 0x16:
                return None
            n = struct.unpack_from("!H", data, pos + 3)[0]
            if len(data) < pos + 5 + n:
                return NEED_MORE if len(data) < MAX_HEAD else None
            hs += data[pos + 5:pos + 5 + n]
            pos += 5 + n
        hello = bytes(hs[:hs_len])
    else:
        hello = body[4:4 + hs_len]
    try:
        p = 2 + 32
        p += 1 + hello[p]
        p += 2 + struct.unpack_from("!H", hello, p)[0]
        p += 1 + hello[p]
        if p + 2 > len(hello):
            return None
        end = p + 2 + struct.unpack_from("!H", hello, p)[0]
        p += 2
        while p + 4 <= end:
            ext, n = struct.unpack_from("!HH", hello, p)
            p += 4
            if ext == 0:
                q = p + 2
                while q + 3 <= p + n:
                    kind, ln = hello[q], struct.unpack_from("!H", hello, q + 1)[0]
                    if kind == 0:
                        return normalize_name(hello[q + 3:q + 3 + ln].decode("ascii"))
                    q += 3 + ln
                return None
            p += n
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


@dataclass(frozen=True)
class HttpHead:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]
    length: int  # bytes of the head, including the blank line

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)


_METHOD_RE = re.compile(rb"^[A-Z]{3,10} ")


def parse_http_head(data: bytes):
    """An HTTP/1.x request head; NEED_MORE if incomplete; None if not HTTP."""
    if not data:
        return NEED_MORE
    if not _METHOD_RE.match(data[:11]) and not (len(data) < 11 and data.isalpha()):
        return None
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return NEED_MORE if len(data) < MAX_HEAD else None
    try:
        lines = data[:end].decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/1."):
        return None
    headers = []
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if not sep or not key or key != key.strip():
            return None
        headers.append((key, value.strip()))
    return HttpHead(method, target, version, tuple(headers), end + 4)


def split_host_port(text: str, default_port: int) -> tuple[str, int] | None:
    """'host:port', '[v6]:port' or 'host' -> (host, port); None if malformed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            return None
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            return None
        return host, int(port_text)
    return host, default_port


def ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


# -- DNS ------------------------------------------------------------------------------------------

QTYPE_A, QTYPE_AAAA = 1, 28
RCODE_NOERROR, RCODE_FORMERR, RCODE_NXDOMAIN, RCODE_REFUSED = 0, 1, 3, 5


@dataclass(frozen=True)
class DnsQuery:
    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    question: bytes  # the raw question section, echoed in the answer


def parse_dns_query(data: bytes) -> DnsQuery | None:
    """The single question of a standard query; None when malformed or not a query."""
    if len(data) < 12:
        return None
    qid, flags, qd, an, ns, _ar = struct.unpack_from("!HHHHHH", data, 0)
    if flags & 0x8000 or (flags >> 11) & 0xF != 0 or qd != 1 or an or ns:
        return None
    p, labels = 12, []
    while True:
        if p >= len(data):
            return None
        n = data[p]
        p += 1
        if n == 0:
            break
        if n > 63 or p + n > len(data):
            return None  # compression pointers do not occur in a question
        labels.append(data[p:p + n])
        p += n
    if p + 4 > len(data):
        return None
    qtype, qclass = struct.unpack_from("!HH", data, p)
    try:
        name = b".".join(labels).decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    return DnsQuery(qid, flags, name, qtype, qclass, data[12:p + 4])


def build_dns_response(q: DnsQuery, rcode: int, addresses: Iterable[str] = (),
                       ttl: int = 30) -> bytes:
    answers = [ipaddress.IPv4Address(a).packed for a in addresses] if rcode == 0 else []
    flags = 0x8000 | (q.flags & 0x0100) | 0x0080 | 0x0400 | rcode  # QR, RD copy, RA, AA
    out = struct.pack("!HHHHHH", q.id, flags, 1, len(answers), 0, 0) + q.question
    for packed in answers:
        out += struct.pack("!HHHIH", 0xC00C, QTYPE_A, 1, ttl, 4) + packed
    return out


def build_dns_query(name: str, qtype: int = QTYPE_A, qid: int = 0x1234) -> bytes:
    """A standard recursive query (used by tests and the bench)."""
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


# -- the server -----------------------------------------------------------------------------------

SNIFF_TIMEOUT_S = 1.0
HEAD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
MAX_UDP_DENIAL_EVENTS = 64
#: Connections one sandbox may hold open through the proxy at once.
MAX_CONNECTIONS = 512
#: Events per second one sandbox may produce (burst EVENT_BURST); the rest are counted.
EVENT_RATE, EVENT_BURST = 200.0, 1000.0


class Resolver:
    """Name -> IPv4 addresses: the config's hosts first, then the host's resolver.

    Addresses given out for a name are remembered for a while, so a transparent
    connection made after our own DNS answer is never mistaken for a forged name when
    the name's round-robin answer changes.
    """

    REMEMBER_S = 300.0

    def __init__(self, config: EgressConfig):
        self.config = config
        self._seen: dict[str, dict[str, float]] = {}

    async def resolve(self, name: str) -> list[str]:
        fixed = self.config.hosts.get(name)
        if fixed is not None:
            found = list(fixed)
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError, OSError):
                infos = []
            found = list(dict.fromkeys(info[4][0] for info in infos))
        now = time.monotonic()
        seen = self._seen.setdefault(name, {})
        for addr in found:
            seen[addr] = now + self.REMEMBER_S
        for addr in [a for a, until in seen.items() if until < now]:
            del seen[addr]
        return found + [a for a in seen if a not in found]


@dataclass
class _Registration:
    sandbox_id: str
    policy: EgressPolicy
    on_event: Callable[[dict], None] | None
    listener: socket.socket | None = None
    udp: socket.socket | None = None
    tasks: set = field(default_factory=set)
    udp_denials: int = 0
    suppressed: int = 0
    counts: dict = field(default_factory=lambda: {"allowed": 0, "denied": 0})
    #: address -> names our resolver answered with it, for this sandbox (DNS pinning)
    pins: dict = field(default_factory=dict)
    #: Called (proxy thread) with pins each time they grow: live restore keeps them
    #: (sandbox/net.py), so a raw client's cached address still pins after a restart.
    pin_sink: Callable[[dict], None] | None = None
    tokens: float = EVENT_BURST
    refilled: float = field(default_factory=time.monotonic)
    #: The sandbox's secrets (sandbox/secrets.SecretSet), None without (rule 5a).
    secrets: object = None


class EgressProxy:
    """One per process: serves the egress sockets of every registered sandbox on its own
    event loop thread (the daemon's loop never copies egress bytes)."""

    def __init__(self, config: EgressConfig | None = None):
        self.config = config or EgressConfig.from_env()
        self.resolver = Resolver(self.config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._regs: dict[str, _Registration] = {}
        self._lock = threading.Lock()
        #: Who hears of attempts of sandboxes registered without their own callback.
        self.default_on_event: Callable[[dict], None] | None = None
        #: Called (on the proxy's thread) with every decided attempt, before the per-sandbox
        #: rate limit of audit events: the daemon's metrics count them all.
        self.decision_listeners: list[Callable[[dict], None]] = []

    # -- life ------------------------------------------------------------------------------

    def _ensure_started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run():
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="corral-egress", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def protect(self, host: str, port: int) -> None:
        """Never let any sandbox reach host:port (host '', a name or 0.0.0.0: any address)."""
        literal = ip_literal(host.strip("[]"))
        if literal is None or ipaddress.ip_address(literal).is_unspecified:
            literal = ""
        self.config.protected.add((literal, int(port)))

    def _call(self, coro, timeout: float = 30.0):
        loop = self._ensure_started()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    def register(self, sandbox_id: str, tcp_listener: socket.socket, udp_sink: socket.socket,
                 policy: EgressPolicy, on_event: Callable[[dict], None] | None,
                 secrets=None, pins: Mapping[str, Iterable[str]] | None = None) -> None:
        """Start serving one sandbox's sockets (blocking until they are served).

        Args:
            secrets: the sandbox's SecretSet (rule 5a), or None.
            pins: the DNS pins a dead process's proxy had given it (live restore).
        """
        reg = _Registration(sandbox_id, policy, on_event, secrets=secrets or None,
                            pins={a: set(names) for a, names in (pins or {}).items()})
        self._call(self._register(reg, tcp_listener, udp_sink))

    def keep_pins(self, sandbox_id: str, sink: Callable[[dict], None]) -> None:
        """Call sink (on the proxy's thread) with the sandbox's DNS pins now and each time
        they grow (live restore keeps them). Raises FailedPrecondition: not registered."""
        self._call(self._keep_pins(sandbox_id, sink))

    async def _keep_pins(self, sandbox_id: str, sink) -> None:
        reg = self._regs.get(sandbox_id)
        if reg is None:
            raise FailedPrecondition(f"{sandbox_id} has no egress link to keep")
        reg.pin_sink = sink
        sink(reg.pins)

    def rebind(self, sandbox_id: str, policy: EgressPolicy,
               on_event: Callable[[dict], None] | None, secrets=None) -> None:
        """Serve a registered sandbox's sockets under another policy, listener and
        secrets from its next connection on: a warm pool's sandbox (runtime/pools.py),
        born linked under a rule that reaches nothing, handed to a request. Its sockets,
        namespace and steering stay as they are.

        Raises:
            FailedPrecondition: the sandbox is not registered, or has already made a
                connection or a DNS query (a ready sandbox runs nothing before it is
                handed out: its history would belong to another policy).
        """
        self._call(self._rebind(sandbox_id, policy, on_event, secrets or None))

    async def _rebind(self, sandbox_id: str, policy: EgressPolicy, on_event, secrets) -> None:
        reg = self._regs.get(sandbox_id)
        if reg is None:
            raise FailedPrecondition(f"{sandbox_id} has no egress link to rebind")
        if reg.tasks or reg.pins or reg.udp_denials or any(reg.counts.values()):
            raise FailedPrecondition(f"{sandbox_id} has already used its egress link; "
                                     "its policy is not replaced")
        reg.policy, reg.on_event, reg.secrets = policy, on_event, secrets

    def unregister(self, sandbox_id: str) -> None:
        """Stop serving, end the sandbox's connections and report them. Idempotent."""
        if self._loop is None or sandbox_id not in self._regs:
            return
        self._call(self._unregister(sandbox_id))

    def connections(self, sandbox_id: str) -> int:
        reg = self._regs.get(sandbox_id)
        return len(reg.tasks) if reg else 0

    async def _register(self, reg, tcp_listener, udp_sink) -> None:
        self._regs[reg.sandbox_id] = reg
        loop = asyncio.get_running_loop()
        reg.listener = tcp_listener
        tcp_listener.setblocking(False)
        loop.add_reader(tcp_listener.fileno(), self._on_accept, reg)
        reg.udp = udp_sink
        loop.add_reader(udp_sink.fileno(), self._on_udp, reg)

    async def _unregister(self, sandbox_id: str) -> None:
        reg = self._regs.pop(sandbox_id, None)
        if reg is None:
            return
        loop = asyncio.get_running_loop()
        if reg.udp is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(reg.udp.fileno())
        if reg.listener is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(reg.listener.fileno())
        for task in list(reg.tasks):
            task.cancel()
        if reg.tasks:
            await asyncio.wait(list(reg.tasks), timeout=5)
        self._emit(reg, {"kind": "net.summary", "allowed": reg.counts["allowed"],
                         "denied": reg.counts["denied"], "suppressed": reg.suppressed},
                   force=True)

    def _on_accept(self, reg: _Registration) -> None:
        for _ in range(64):
            try:
                conn, _addr = reg.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. EMFILE: pause accepting a moment (level-triggered)
                loop = asyncio.get_running_loop()
                loop.remove_reader(reg.listener.fileno())
                loop.call_later(0.1, self._resume_accepting, reg)
                return
            conn.setblocking(False)
            if len(reg.tasks) >= MAX_CONNECTIONS:
                _reset(conn)
                reg.suppressed += 1
                reg.counts["denied"] += 1
                continue
            self._spawn(reg, self._serve_tcp(reg, conn))

    def _resume_accepting(self, reg: _Registration) -> None:
        if self._regs.get(reg.sandbox_id) is reg:
            asyncio.get_running_loop().add_reader(reg.listener.fileno(), self._on_accept, reg)

    def _spawn(self, reg, coro):
        task = asyncio.get_running_loop().create_task(coro)
        reg.tasks.add(task)
        task.add_done_callback(reg.tasks.discard)
        return task

    def _emit(self, reg: _Registration, event: dict, force: bool = False) -> None:
        event = {"sandbox_id": reg.sandbox_id, **event}
        if "decision" in event:
            reg.counts["allowed" if event["decision"] == "allow" else "denied"] += 1
            for listener in self.decision_listeners:
                with contextlib.suppress(Exception):  # metrics never break the proxy
                    listener(event)
        if not force:
            now = time.monotonic()
            reg.tokens = min(EVENT_BURST, reg.tokens + (now - reg.refilled) * EVENT_RATE)
            reg.refilled = now
            if reg.tokens < 1:
                reg.suppressed += 1
                return
            reg.tokens -= 1
        sink = reg.on_event or self.default_on_event
        if sink is not None:
            try:
                sink(event)
            except Exception:  # an audit sink failing must not kill the proxy
                pass

    # -- TCP -------------------------------------------------------------------------------

    async def _serve_tcp(self, reg, conn: socket.socket):
        started = time.monotonic()
        event = {"kind": "net.connect", "client": "", "port": 0, "name": "", "address": "",
                 "bytes_out": 0, "bytes_in": 0}
        upstream = None
        try:
            dst_ip, dst_port = conn.getsockname()[:2]
            peer = conn.getpeername()
            event.update(client=f"{peer[0]}:{peer[1]}", port=dst_port, address=dst_ip)
            if (dst_ip, dst_port) == (GATEWAY, PROXY_PORT):
                upstream, first = await self._explicit(reg, conn, event)
            else:
                upstream, first = await self._transparent(reg, conn, event, dst_ip, dst_port)
            if upstream is None:
                return
            await self._relay(reg, conn, upstream, first, event)
        except Exfiltration as exc:
            self._secret_blocked(reg, event, exc.secret, "stream")
            _reset(upstream)
            upstream = None
            if event.get("mode") == "http" and not event["bytes_in"]:
                await _respond(conn, 403, "Forbidden", "corral: egress denied: the request "
                                                       "carries a secret's placeholder\n")
        except asyncio.CancelledError:
            event.setdefault("error", "sandbox destroyed")
        except Exception as exc:  # a broken client must never take the proxy down
            event.setdefault("error", f"{type(exc).__name__}: {exc}")
        finally:
            if reg.secrets is not None and "error" in event:  # it may quote a peer
                event["error"] = reg.secrets.redact(event["error"])
            for sock in (conn, upstream):
                if sock is not None:
                    sock.close()
            event["duration_s"] = round(time.monotonic() - started, 6)
            if "decision" not in event:  # ended (client gone, sandbox destroyed) undecided
                event.update(decision="deny", reason="closed before a decision: "
                             + event.get("error", "the client went away"))
            self._emit(reg, event)

    async def _relay(self, reg, conn, upstream, first: bytes, event: dict) -> None:
        """Move the connection's bytes: intercepted toward a secret's host on 443, scanned
        for placeholders elsewhere when the sandbox has secrets, else spliced (rule 5a)."""
        loop = asyncio.get_running_loop()
        secrets = reg.secrets
        if secrets is not None and event["port"] == 443 and event["mode"] != "http" \
                and secrets.intercepts(event["name"]):
            from . import intercept

            await intercept.serve(
                secrets, event["name"], conn, upstream, first, event,
                self.config.upstream_tls_context(),
                lambda secret, where: self._secret_blocked(reg, event, secret, where))
            return
        scanner = secrets.outbound() if secrets is not None else None
        if scanner is not None:
            first = scanner.feed(first)
        if first:
            await loop.sock_sendall(upstream, first)
            event["bytes_out"] += len(first)
        if scanner is None:
            await _splice_both(loop, conn, upstream, event)
        else:
            await _relay_scanned(loop, conn, upstream, event, scanner)

    def _secret_blocked(self, reg, event: dict, secret: str, where: str) -> None:
        """Report a refused placeholder (net.secret) and turn the attempt into a denial."""
        event.update(decision="deny", reason=f"blocked: the placeholder of secret {secret} "
                                             f"in the {where}")
        self._emit(reg, {"kind": "net.secret", "action": "blocked-exfiltration",
                         "secret": secret, "where": where, "mode": event.get("mode", ""),
                         "name": event.get("name", ""), "address": event.get("address", ""),
                         "port": event.get("port", 0)})

    def _leaks_in_name(self, reg, event: dict, text: str, where: str) -> bool:
        """Does a name the sandbox asked for carry a placeholder? (Reported if so.)"""
        secret = reg.secrets.placeholder_in_name(text) if reg.secrets is not None else None
        if secret is None:
            return False
        event["name"] = event.get("name") or normalize_name(text) or ""
        self._secret_blocked(reg, event, secret, where)
        return True

    async def _explicit(self, reg, conn, event):
        """HTTP proxy protocol: CONNECT host:port, or a request with an absolute URI."""
        head, buf = await _read_head(conn, HEAD_TIMEOUT_S, parse_http_head)
        if not isinstance(head, HttpHead):
            event.update(mode="proxy", decision="deny", reason="not an HTTP proxy request")
            await _respond(conn, 400, "Bad Request", "corral: not an HTTP proxy request\n")
            return None, b""
        if head.method == "CONNECT":
            event["mode"] = "connect"
            hp = split_host_port(head.target, 443)
        else:
            event["mode"] = "http"
            m = re.match(r"^http://([^/?#]+)(.*)$", head.target, re.IGNORECASE)
            hp = split_host_port(m.group(1).rpartition("@")[2], 80) if m else None
        if hp is None:
            event.update(decision="deny", reason=f"bad proxy target {head.target[:200]!r}")
            await _respond(conn, 400, "Bad Request", "corral: bad proxy target\n")
            return None, b""
        host, port = hp
        literal = ip_literal(host)
        name = None if literal else normalize_name(host)
        event.update(name=name or "", port=port, address=literal or "")
        if self._leaks_in_name(reg, event, host, "proxy target"):
            await _respond(conn, 403, "Forbidden", "corral: egress denied: the target "
                                                   "carries a secret's placeholder\n")
            return None, b""
        if literal is None and name is None:
            event.update(decision="deny", reason=f"{host[:200]!r} is not a host name")
            await _respond(conn, 400, "Bad Request", "corral: not a host name\n")
            return None, b""
        resolved = await self.resolver.resolve(name) if name and reg.policy.name_rule(
            name, port) else []
        decision = reg.policy.decide(port, name=name, dst=literal, resolved=resolved)
        event.update(address=decision.address, reason=decision.reason, rule=decision.rule,
                     decision="allow" if decision.allowed else "deny")
        if not decision.allowed:
            await _respond(conn, 403, "Forbidden", f"corral: egress denied: {decision.reason}\n")
            return None, b""
        upstream = await _connect(decision.address, port, event, reg.policy)
        if upstream is None:
            if event["decision"] == "deny":  # the connected peer was refused (rule 4a)
                await _respond(conn, 403, "Forbidden",
                               f"corral: egress denied: {event['reason']}\n")
            else:
                await _respond(conn, 502, "Bad Gateway", f"corral: {event['error']}\n")
            return None, b""
        rest = bytes(buf[head.length:])  # what came after the head goes upstream
        if head.method == "CONNECT":
            try:
                await asyncio.get_running_loop().sock_sendall(
                    conn, b"HTTP/1.1 200 Connection established\r\n\r\n")
            except BaseException:
                upstream.close()
                raise
            return upstream, rest
        m = re.match(r"^http://[^/?#]+(.*)$", head.target, re.IGNORECASE)
        # One request per connection: the server closes after answering, so the client's
        # next request comes on a new connection and gets its own decision.
        lines = [f"{head.method} {m.group(1) or '/'} {head.version}"]
        lines += [f"{k}: {v}" for k, v in head.headers
                  if not k.lower().startswith("proxy-")
                  and k.lower() not in ("connection", "keep-alive")]
        lines.append("Connection: close")
        return upstream, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + rest

    async def _transparent(self, reg, conn, event, dst_ip, dst_port):
        """A connection that did not ask for a proxy: its destination is its own."""
        event["mode"] = "transparent"
        policy = reg.policy
        addr_decision = policy.decide(dst_port, dst=dst_ip)
        if addr_decision.allowed or "protected" in addr_decision.reason:
            decision, name, buf = addr_decision, None, b""
        else:
            sniffed, buf = await _read_head(conn, SNIFF_TIMEOUT_S, _sniff_name)
            name = sniffed if isinstance(sniffed, str) else None
            if name is None:
                # Nothing names the destination (a raw protocol): it is allowed if our
                # resolver gave this sandbox the address for a name allowed on this port.
                name = next((n for n in sorted(reg.pins.get(dst_ip, ()))
                             if policy.name_rule(n, dst_port)), None)
                if name is not None:
                    event["pinned"] = True
            elif self._leaks_in_name(reg, event, name, "server name"):
                _reset(conn)
                return None, b""
            resolved = await self.resolver.resolve(name) if name and policy.name_rule(
                name, dst_port) else []
            decision = policy.decide(dst_port, name=name, dst=dst_ip, resolved=resolved)
        event.update(name=name or "", reason=decision.reason, rule=decision.rule,
                     decision="allow" if decision.allowed else "deny")
        if not decision.allowed:
            _reset(conn)
            return None, b""
        upstream = await _connect(decision.address, dst_port, event, policy)
        if upstream is None:
            _reset(conn)
            return None, b""
        return upstream, bytes(buf)

    # -- UDP -------------------------------------------------------------------------------

    def _on_udp(self, reg: _Registration) -> None:
        for _ in range(64):
            try:
                data, anc, _flags, peer = reg.udp.recvmsg(4096, 64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            dst = _orig_dst(anc)
            if dst == (GATEWAY, DNS_PORT):
                self._spawn(reg, self._dns(reg, data, peer))
                continue
            reg.udp_denials += 1
            if reg.udp_denials > MAX_UDP_DENIAL_EVENTS:
                reg.suppressed += 1
                reg.counts["denied"] += 1
                continue
            self._emit(reg, {
                "kind": "net.udp", "decision": "deny", "mode": "udp",
                "client": f"{peer[0]}:{peer[1]}", "address": dst[0] if dst else "",
                "port": dst[1] if dst else 0, "bytes_out": len(data),
                "reason": "UDP is dropped (only DNS to the sandbox resolver)"})

    async def _dns(self, reg: _Registration, data: bytes, peer) -> None:
        q = parse_dns_query(data)
        event = {"kind": "net.dns", "mode": "dns", "client": f"{peer[0]}:{peer[1]}",
                 "address": GATEWAY, "port": DNS_PORT}
        if q is None:
            event.update(decision="deny", reason="malformed DNS query", name="")
            self._emit(reg, event)
            return
        name = normalize_name(q.name) or ""
        event["name"] = name
        event["qtype"] = q.qtype
        if self._leaks_in_name(reg, event, q.name, "DNS query"):
            reply = build_dns_response(q, RCODE_REFUSED)
        elif not name or not reg.policy.name_allowed(name):
            reply = build_dns_response(q, RCODE_NXDOMAIN)
            event.update(decision="deny", reason=f"no rule allows {name or q.name!r}")
        elif q.qtype == QTYPE_A and q.qclass == 1:
            answers = reg.policy.dns_answers(name, await self.resolver.resolve(name))
            grew = False
            for addr in answers:
                names = reg.pins.setdefault(addr, set())
                grew = grew or name not in names
                names.add(name)
            if grew and reg.pin_sink is not None:
                with contextlib.suppress(Exception):  # keeping them never breaks DNS
                    reg.pin_sink(reg.pins)
            reply = build_dns_response(q, RCODE_NOERROR if answers else RCODE_NXDOMAIN,
                                       answers)
            event.update(decision="allow" if answers else "deny",
                         reason="name rule" if answers else "no public address",
                         answers=answers)
        else:
            reply = build_dns_response(q, RCODE_NOERROR)  # no AAAA etc.: no IPv6 route
            event.update(decision="allow", reason="name rule (no records of this type)")
        with contextlib.suppress(OSError):
            reg.udp.sendto(reply, peer)
        self._emit(reg, event)


def _sniff_name(data: bytes):
    """SNI or Host of the first bytes of a connection; NEED_MORE; or None."""
    if not data:
        return NEED_MORE
    if data[0] == 0x16:
        return parse_sni(data)
    head = parse_http_head(data)
    if isinstance(head, HttpHead):
        host = head.header("host")
        hp = split_host_port(host, 80) if host else None
        return normalize_name(hp[0]) if hp and not ip_literal(hp[0]) else None
    return head  # NEED_MORE or None


def _orig_dst(ancillary) -> tuple[str, int] | None:
    for level, kind, payload in ancillary:
        if level == socket.SOL_IP and kind == 20 and len(payload) >= 8:  # IP_ORIGDSTADDR
            port = struct.unpack_from("!H", payload, 2)[0]
            return socket.inet_ntoa(payload[4:8]), port
    return None


async def _respond(conn: socket.socket, code: int, text: str, body: str) -> None:
    payload = body.encode()
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_sendall(conn, (
            f"HTTP/1.1 {code} {text}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n").encode() + payload)


def _reset(conn: socket.socket) -> None:
    """Refuse a transparent connection with a RST (SO_LINGER 0), not a polite FIN."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


async def _read_head(conn: socket.socket, timeout: float, parse):
    """Read until parse() gives an answer: (answer, or None on timeout/EOF; bytes read)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = parse(bytes(buf))
                if result is not NEED_MORE:
                    return result, buf
                chunk = await loop.sock_recv(conn, MAX_HEAD)
                if not chunk:
                    return None, buf
                buf += chunk
    except TimeoutError:
        return None, buf


async def _connect(host: str, port: int, event: dict,
                   policy: EgressPolicy) -> socket.socket | None:
    """A non-blocking TCP connection from the proxy's thread, which is in the host netns.

    The connected socket's real peer is judged again (rule 4a): a peer other than the
    address decided on, a protected endpoint or an unnamed address of this host turns the
    event into a denial and the connection is closed before a byte is relayed.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except (OSError, TimeoutError) as exc:
        sock.close()
        event["error"] = f"upstream {host}:{port}: " + (
            os.strerror(exc.errno) if getattr(exc, "errno", None) else "timed out")
        return None
    except BaseException:
        sock.close()
        raise
    try:
        peer, local = sock.getpeername()[0], sock.getsockname()[0]
    except OSError as exc:  # reset already
        sock.close()
        event["error"] = f"upstream {host}:{port}: {os.strerror(exc.errno)}"
        return None
    why = policy.peer_refusal(host, peer, local, port)
    if why is not None:
        _reset(sock)
        event.update(decision="deny", reason=why)
        return None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_SPLICE_FLAGS = 0x1 | 0x2  # SPLICE_F_MOVE | SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
#: Splices per readiness wake-up of one direction before yielding to the loop.
SPLICE_ROUNDS = 8


class _Splice:
    """One direction of a relayed connection: src -> pipe -> dst with splice(2), driven by
    the loop's readiness callbacks. Bytes never enter Python; a full dst stops reading
    src (backpressure); EOF on src becomes shutdown(SHUT_WR) on dst once drained."""

    def __init__(self, loop, src: socket.socket, dst: socket.socket, event: dict, key: str):
        self.loop, self.src, self.dst, self.event, self.key = loop, src, dst, event, key
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.capacity = 65536
        with contextlib.suppress(OSError):
            import fcntl

            self.capacity = fcntl.fcntl(self.pipe_w, _F_SETPIPE_SZ, PIPE_BYTES)
        self.pending = 0
        self.eof = False
        self.done = loop.create_future()
        self.reading = self.writing = False
        self._read_on()

    def _read_on(self):
        if not self.reading:
            self.loop.add_reader(self.src.fileno(), self._readable)
            self.reading = True

    def _read_off(self):
        if self.reading:
            self.loop.remove_reader(self.src.fileno())
            self.reading = False

    def _readable(self):
        # Keep moving while data keeps coming (up to a bound, to stay fair to the other
        # connections on this loop): one readiness wake-up, many splices.
        for _ in range(SPLICE_ROUNDS):
            try:
                n = os.splice(self.src.fileno(), self.pipe_w, self.capacity - self.pending,
                              flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                return self._finish(exc)
            if n == 0:
                self.eof = True
                self._read_off()
            self.pending += n
            self._flush()
            if self.pending or self.eof or self.done.done():
                return  # the destination is full (writer armed), or this direction ended

    def _writable(self):
        self._flush()

    def _flush(self):
        while self.pending:
            try:
                n = os.splice(self.pipe_r, self.dst.fileno(), self.pending, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                self._read_off()
                if not self.writing:
                    self.loop.add_writer(self.dst.fileno(), self._writable)
                    self.writing = True
                return
            except OSError as exc:
                return self._finish(exc)
            self.pending -= n
            self.event[self.key] += n
        if self.writing:
            self.loop.remove_writer(self.dst.fileno())
            self.writing = False
        if self.eof:
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            self._finish(None)
        elif self.pending < self.capacity:
            self._read_on()

    def _finish(self, exc):
        self.close()
        if not self.done.done():
            self.done.set_result(exc)

    def close(self):
        self._read_off()
        if self.writing:
            self.loop.remove_writer(self.dst.fileno())
            self.writing = False
        for fd in (self.pipe_r, self.pipe_w):
            if fd >= 0:
                os.close(fd)
        self.pipe_r = self.pipe_w = -1


async def _splice_both(loop, conn: socket.socket, upstream: socket.socket, event: dict):
    """Relay both directions until both reached EOF (or one failed)."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    up = _Splice(loop, conn, upstream, event, "bytes_out")
    down = _Splice(loop, upstream, conn, event, "bytes_in")
    try:
        pending = {up.done, down.done}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(f.result() is not None for f in done):
                break  # a reset or error on either side ends both
    finally:
        up.close()
        down.close()


#: Bytes one read of a scanned relay takes from the sandbox.
SCAN_READ_BYTES = 256 * 1024


async def _copy_scanned(loop, src: socket.socket, dst: socket.socket, event: dict,
                        scanner) -> None:
    """The sandbox -> server direction of a sandbox with secrets: read, scan, send; EOF
    becomes shutdown(SHUT_WR). Raises Exfiltration before any byte of a placeholder goes
    out (the scanner holds back what could be the start of one)."""
    while True:
        data = await loop.sock_recv(src, SCAN_READ_BYTES)
        out = scanner.feed(data) if data else scanner.finish()
        if out:
            await loop.sock_sendall(dst, out)
            event["bytes_out"] += len(out)
        if not data:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            return


async def _relay_scanned(loop, conn: socket.socket, upstream: socket.socket, event: dict,
                         scanner) -> None:
    """Relay both directions, the sandbox's through the scanner (the server's spliced),
    until both reached EOF or one failed; an Exfiltration propagates."""
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    down = _Splice(loop, upstream, conn, event, "bytes_in")
    up = loop.create_task(_copy_scanned(loop, conn, upstream, event, scanner))
    try:
        pending = {up, down.done}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if up in done and up.exception() is not None:
                if isinstance(up.exception(), Exfiltration):
                    raise up.exception()
                break  # the sandbox's side failed (reset): both end
            if down.done in done and down.done.result() is not None:
                break
    finally:
        up.cancel()
        down.close()


_shared: EgressProxy | None = None
_shared_lock = threading.Lock()


def shared_proxy() -> EgressProxy:
    """The process's proxy (configured from the environment at first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = EgressProxy()
        return _shared
