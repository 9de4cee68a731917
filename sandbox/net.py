"""Sandbox networking: an egress namespace per sandbox, its veth pair, and the steering.

A sandbox with an egress policy gets this, all of it outside the sandbox's reach:

  sandbox netns                      egress netns (anonymous, ours)          host netns
  ─────────────                      ─────────────────────────────           ──────────
  lo, eth0 100.127.255.2/30  ─veth─  corral-eg 100.127.255.1/30              the proxy's
  default via 100.127.255.1          rule: iif corral-eg -> table 100          upstream
  /etc/resolv.conf -> .1             table 100: local 0.0.0.0/0 (AnyIP)        sockets
                                     sk_lookup BPF: every TCP SYN -> listener
                                                    (IP_TRANSPARENT: it may answer as any
                                                    address) every UDP datagram -> udp sink
                                     (both sockets created here, served from the host)

* Nothing is routed or NATed anywhere: every packet the sandbox sends is delivered
  *locally* in the egress namespace (AnyIP for what arrives on the veth), and a
  BPF sk_lookup program hands every TCP connection and UDP datagram, whatever its
  destination address and port, to the proxy's two sockets. The original destination is
  simply the accepted socket's own address (getsockname) -- no conntrack, no NAT tables.
  ip_forward stays 0 in the egress namespace, so nothing could leave it even if a rule
  were missing.
* The egress namespace is anonymous: no /run/netns entry. It lives as long as something
  holds it (our namespace fd, the two sockets, the BPF link); `NetAttachment.close()`
  drops them all and the kernel deletes the namespace and with it the veth pair (deleting
  one end of a veth deletes both). If the process dies, the kernel does the same, so a
  crash cannot leave a namespace or veth behind.
* Namespaces are entered only from short-lived threads that exist for that purpose
  (setns(CLONE_NEWNET) changes the calling thread only); no long-lived thread of the
  runtime ever leaves the host namespace, so the proxy's upstream connections are always
  made from the host.
* Every sandbox uses the same link addresses: each pair lives in its own two namespaces.

Rootless (an unprivileged caller, `attach_rootless`): the host part above needs CAP_NET_ADMIN
on the host (a veth into a namespace of ours) and sk_lookup needs CAP_BPF and CAP_NET_ADMIN
in the initial user namespace, none of which a user has. The user does own the sandbox's
user namespace, hence its network namespace, so the proxy's two sockets are made *there*:

  sandbox netns                                          host netns
  ─────────────                                          ──────────
  lo 127.0.0.1, 100.127.255.1/32   <- TCP listener :3128 the proxy (as the user),
  no other link, no route           <- DNS UDP :53       upstream sockets made here
  HTTP(S)_PROXY, resolv.conf -> .1   (made by egress_sockets.py, fds sent back)

* The same policy, audit events, secrets scanning and interception: the proxy serves
  these sockets exactly as the root path's (a connection to GATEWAY:PROXY_PORT is an
  explicit one), and the sandbox's environment and resolv.conf are the same.
* What cannot be had: transparent steering. A program that ignores HTTP_PROXY gets
  ENETUNREACH at once (there is no link and no route), and a rule with a port other than
  80 or 443 -- one only a raw TCP client would need -- is refused at start, naming the
  rule (`rootless_rule_problem`).
* The sockets live in the sandbox's namespace but nothing in the sandbox can take them
  over: its processes have no capabilities, the ports are bound without SO_REUSEADDR or
  SO_REUSEPORT, and they are bound before any command runs.

The proxy (sandbox/proxy.py) serves the sockets; this module only builds and removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as errno_mod
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from .errors import SandboxSetupError, UnsupportedHost

#: The egress side of the link: where the proxy listens and the resolver answers.
GATEWAY = "100.127.255.1"
#: The sandbox side of the link.
SANDBOX_ADDR = "100.127.255.2"
PREFIX_LEN = 30
#: Port of the explicit (HTTP_PROXY) proxy on GATEWAY; every other TCP port is transparent.
PROXY_PORT = 3128
DNS_PORT = 53
EGRESS_IFNAME = "corral-eg"
SANDBOX_IFNAME = "eth0"
#: Routing table of the AnyIP route in the egress namespace.
ANYIP_TABLE = 100

CLONE_NEWNET = 0x40000000
_SYS_BPF = 321  # x86_64
_SIOCGSKNS = 0x894C


_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


def _setns(fd: int, nstype: int, what: str) -> None:
    if _lib().setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise SandboxSetupError("setns", what, err)


def _unshare_net() -> None:
    if _lib().unshare(CLONE_NEWNET) != 0:
        raise SandboxSetupError("unshare(CLONE_NEWNET)", "egress namespace", ctypes.get_errno())


def in_netns(ns_fd: int | None, fn, *args, what: str = "netns"):
    """Run fn(*args) in a fresh thread inside the network namespace ns_fd; return its result.

    ns_fd None: the thread first makes a new network namespace (unshare). The thread ends
    with fn, so no thread of the caller's ever leaves its namespace. Sockets fn creates
    stay in that namespace when used from other threads.
    """
    result: dict = {}

    def body():
        try:
            if ns_fd is None:
                _unshare_net()
            else:
                _setns(ns_fd, CLONE_NEWNET, what)
            result["value"] = fn(*args)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    t = threading.Thread(target=body, name="corral-netns", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result.get("value")


def socket_netns_inode(sock: socket.socket) -> int:
    """Inode of the network namespace a socket belongs to (SIOCGSKNS)."""
    import fcntl

    fd = fcntl.ioctl(sock.fileno(), _SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


# -- BPF: the sk_lookup program that steers everything to the proxy's sockets ----------------

_BPF_MAP_CREATE, _BPF_MAP_UPDATE_ELEM, _BPF_PROG_LOAD, _BPF_LINK_CREATE = 0, 2, 5, 28
_BPF_MAP_TYPE_SOCKMAP = 15
_BPF_PROG_TYPE_SK_LOOKUP = 30
_BPF_SK_LOOKUP = 36
_HELPER_MAP_LOOKUP, _HELPER_SK_RELEASE, _HELPER_SK_ASSIGN = 1, 86, 124
#: Sockmap slots: the TCP listener and the UDP sink.
SLOT_TCP, SLOT_UDP = 0, 1


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def sk_lookup_program(map_fd: int) -> bytes:
    """The steering program: IPv4 TCP -> slot 0, IPv4 UDP -> slot 1, anything else passes.

    struct bpf_sk_lookup: family at offset 8, protocol at 12. Returns SK_PASS (1) always;
    the socket was assigned when the slot held one.
    """
    r0, r1, r2, r3, r6, r7, r10 = 0, 1, 2, 3, 6, 7, 10
    mov_x, mov_k, ldx_w, stx_w, add_k = 0xBF, 0xB7, 0x61, 0x63, 0x07
    jeq_k, jne_k, call, exit_ = 0x15, 0x55, 0x85, 0x95
    pass_ = 22  # index of the SK_PASS exit; jump offsets are relative to the next insn
    prog = [
        _insn(mov_x, r6, r1),                                   # 0  r6 = ctx
        _insn(ldx_w, r2, r6, 8),                                # 1  r2 = family
        _insn(jne_k, r2, 0, pass_ - 3, socket.AF_INET),         # 2  not IPv4: pass
        _insn(ldx_w, r2, r6, 12),                               # 3  r2 = protocol
        _insn(mov_k, r3, 0, 0, SLOT_TCP),                       # 4  r3 = TCP slot
        _insn(jeq_k, r2, 0, 8 - 6, socket.IPPROTO_TCP),         # 5  TCP: key at 8
        _insn(mov_k, r3, 0, 0, SLOT_UDP),                       # 6  r3 = UDP slot
        _insn(jne_k, r2, 0, pass_ - 8, socket.IPPROTO_UDP),     # 7  neither: pass
        _insn(stx_w, r10, r3, -4),                              # 8  key on the stack
        _insn(mov_x, r2, r10),                                  # 9
        _insn(add_k, r2, 0, 0, -4),                             # 10 r2 = &key
        _insn(0x18, r1, 1, 0, map_fd),                          # 11 r1 = map (PSEUDO_MAP_FD)
        _insn(0, 0, 0, 0, 0),                                   # 12 upper half of the load
        _insn(call, 0, 0, 0, _HELPER_MAP_LOOKUP),               # 13 r0 = socket or NULL
        _insn(jeq_k, r0, 0, pass_ - 15, 0),                     # 14 empty slot: pass
        _insn(mov_x, r7, r0),                                   # 15 r7 = socket reference
        _insn(mov_x, r1, r6),                                   # 16
        _insn(mov_x, r2, r7),                                   # 17
        _insn(mov_k, r3, 0, 0, 0),                              # 18
        _insn(call, 0, 0, 0, _HELPER_SK_ASSIGN),                # 19 bpf_sk_assign(ctx, sk, 0)
        _insn(mov_x, r1, r7),                                   # 20
        _insn(call, 0, 0, 0, _HELPER_SK_RELEASE),               # 21 drop the reference
        _insn(mov_k, r0, 0, 0, 1),                              # 22 SK_PASS
        _insn(exit_),                                           # 23
    ]
    return b"".join(prog)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    ret = _lib().syscall(_SYS_BPF, cmd, buf, 128)
    if ret < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ret


class SkLookup:
    """A sockmap, the steering program and its link to one network namespace."""

    def __init__(self, ns_fd: int, tcp_listener: socket.socket, udp_sink: socket.socket):
        self.map_fd = self.prog_fd = self.link_fd = -1
        try:
            self.map_fd = _bpf(_BPF_MAP_CREATE, struct.pack(
                "<IIIII", _BPF_MAP_TYPE_SOCKMAP, 4, 4, 2, 0))
            for slot, sock in ((SLOT_TCP, tcp_listener), (SLOT_UDP, udp_sink)):
                key = ctypes.c_uint32(slot)
                value = ctypes.c_uint32(sock.fileno())
                _bpf(_BPF_MAP_UPDATE_ELEM, struct.pack(
                    "<IIQQQ", self.map_fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0))
            self.prog_fd = self._load(self.map_fd)
            self.link_fd = _bpf(_BPF_LINK_CREATE, struct.pack(
                "<IIII", self.prog_fd, ns_fd, _BPF_SK_LOOKUP, 0))
        except OSError as exc:
            self.close()
            if exc.errno in (errno_mod.EINVAL, errno_mod.ENOSYS, errno_mod.EOPNOTSUPP):
                raise UnsupportedHost(
                    f"egress steering needs BPF sk_lookup (Linux 5.9+): bpf() said "
                    f"{os.strerror(exc.errno)}") from None
            raise SandboxSetupError("bpf(sk_lookup)", "egress namespace", exc.errno) from None

    @staticmethod
    def _load(map_fd: int) -> int:
        insns = sk_lookup_program(map_fd)
        insn_buf = ctypes.create_string_buffer(insns, len(insns))
        license_ = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(65536)
        attr = struct.pack("<IIQQIIQII16sII", _BPF_PROG_TYPE_SK_LOOKUP, len(insns) // 8,
                           ctypes.addressof(insn_buf), ctypes.addressof(license_), 0, 0, 0, 0,
                           0, b"corral_egress", 0, _BPF_SK_LOOKUP)
        try:
            return _bpf(_BPF_PROG_LOAD, attr)
        except OSError:
            pass
        # Load again with the verifier log, to say why.
        attr = struct.pack("<IIQQIIQII16sII", _BPF_PROG_TYPE_SK_LOOKUP, len(insns) // 8,
                           ctypes.addressof(insn_buf), ctypes.addressof(license_), 1,
                           len(log), ctypes.addressof(log), 0, 0, b"corral_egress", 0,
                           _BPF_SK_LOOKUP)
        try:
            return _bpf(_BPF_PROG_LOAD, attr)
        except OSError as exc:
            text = log.value.decode(errors="replace").strip().splitlines()
            raise OSError(exc.errno, f"{exc.strerror}: {' | '.join(text[-3:])}") from None

    @classmethod
    def adopt(cls, map_fd: int, prog_fd: int, link_fd: int) -> SkLookup:
        """The steering another process made, from its descriptors (live restore: the
        holder kept them); this object owns them from here on."""
        steering = cls.__new__(cls)
        steering.map_fd, steering.prog_fd, steering.link_fd = map_fd, prog_fd, link_fd
        return steering

    def descriptors(self) -> list[int]:
        return [self.map_fd, self.prog_fd, self.link_fd]

    def close(self) -> None:
        for name in ("link_fd", "prog_fd", "map_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


# -- the attachment -----------------------------------------------------------------------------


@dataclass
class NetAttachment:
    """Everything that gives one sandbox its egress link; close() removes all of it."""

    #: Our descriptor of the egress namespace; -1 rootless (the sockets are in the sandbox's).
    egress_ns_fd: int
    #: Inode of the namespace the proxy's sockets live in: the egress namespace, or the
    #: sandbox's own rootless (to prove no socket of ours holds it after close()).
    egress_ns_inode: int
    #: The proxy's TCP listener and UDP sink, both inside that namespace.
    tcp_listener: socket.socket
    udp_sink: socket.socket
    #: The sk_lookup program steering every flow; None rootless (explicit proxy only).
    steering: SkLookup | None
    closed: bool = field(default=False)

    def close(self) -> None:
        """Drop every reference to the egress namespace: the kernel then deletes it, and
        with it the veth pair and every rule and route. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.steering is not None:
            self.steering.close()
        for sock in (self.tcp_listener, self.udp_sink):
            with contextlib.suppress(OSError):
                sock.close()
        if self.egress_ns_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.egress_ns_fd)
        self.egress_ns_fd = -1


def _ipr():
    try:
        from pyroute2 import IPRoute
    except ImportError:  # pragma: no cover - an install without the dependency
        raise UnsupportedHost("egress networking needs pyroute2 (pip install pyroute2)") from None
    return IPRoute()


def _netlink_error(step: str, exc: Exception) -> SandboxSetupError:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None) or errno_mod.EIO
    return SandboxSetupError(step, None, abs(int(code)), str(exc))


def _setup_egress(sandbox_ns_fd: int):
    """In a fresh egress namespace: veth pair, addresses, AnyIP, the two proxy sockets."""
    ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _ipr() as ipr:
            try:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                ipr.link("add", ifname=EGRESS_IFNAME, kind="veth",
                         peer={"ifname": SANDBOX_IFNAME})
                eg = ipr.link_lookup(ifname=EGRESS_IFNAME)[0]
                peer = ipr.link_lookup(ifname=SANDBOX_IFNAME)[0]
                ipr.link("set", index=peer, net_ns_fd=sandbox_ns_fd)
                ipr.addr("add", index=eg, address=GATEWAY, prefixlen=PREFIX_LEN)
                ipr.link("set", index=eg, state="up")
                # AnyIP for what the sandbox sends: every destination is local here.
                ipr.route("add", dst="0.0.0.0/0", type="local", scope=254,
                          table=ANYIP_TABLE, oif=lo)
                ipr.rule("add", iifname=EGRESS_IFNAME, table=ANYIP_TABLE, priority=100)
            except Exception as exc:
                raise _netlink_error("egress link", exc) from None
        for name in ("all", "default", EGRESS_IFNAME):
            _write_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")
        _write_sysctl("net/ipv4/ip_forward", "0")
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # The AnyIP route is only seen by packets arriving on the veth, so replies
            # from a destination address that is not ours need a transparent socket
            # (no source-address check on output); accepted sockets inherit it.
            tcp.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
            tcp.bind(("0.0.0.0", PROXY_PORT))
            tcp.listen(1024)
            tcp.setblocking(False)
            udp.setsockopt(socket.SOL_IP, _IP_RECVORIGDSTADDR, 1)
            udp.bind(("0.0.0.0", DNS_PORT))
            udp.setblocking(False)
        except OSError as exc:
            tcp.close()
            udp.close()
            raise SandboxSetupError("bind", f"{GATEWAY}:{PROXY_PORT}", exc.errno) from None
        return ns_fd, os.fstat(ns_fd).st_ino, tcp, udp
    except BaseException:
        os.close(ns_fd)
        raise


_IP_TRANSPARENT = 19
#: setsockopt(IP_RECVORIGDSTADDR): recvmsg reports each datagram's destination.
_IP_RECVORIGDSTADDR = 20


def _write_sysctl(name: str, value: str) -> None:
    """Write a net sysctl of the calling thread's network namespace (resolved at open)."""
    try:
        with open(f"/proc/sys/{name}", "w") as f:
            f.write(value)
    except OSError as exc:
        raise SandboxSetupError("sysctl", f"/proc/sys/{name}", exc.errno) from None


def _setup_sandbox_side() -> None:
    with _ipr() as ipr:
        try:
            idx = ipr.link_lookup(ifname=SANDBOX_IFNAME)[0]
            ipr.addr("add", index=idx, address=SANDBOX_ADDR, prefixlen=PREFIX_LEN)
            ipr.link("set", index=idx, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY)
        except Exception as exc:
            raise _netlink_error("sandbox link", exc) from None
    for name in ("all", "default", SANDBOX_IFNAME):
        _write_sysctl(f"net/ipv6/conf/{name}/disable_ipv6", "1")


def attach(init_pid: int) -> NetAttachment:
    """Give the sandbox whose PID 1 is init_pid its egress link; returns what holds it.

    Raises:
        SandboxSetupError: a netlink, namespace or BPF step failed (step named).
        UnsupportedHost: the kernel lacks BPF sk_lookup, or pyroute2 is missing.
    """
    try:
        sandbox_ns_fd = os.open(f"/proc/{init_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxSetupError("open", f"/proc/{init_pid}/ns/net", exc.errno) from None
    try:
        ns_fd, inode, tcp, udp = in_netns(None, _setup_egress, sandbox_ns_fd)
        try:
            steering = SkLookup(ns_fd, tcp, udp)
        except BaseException:
            tcp.close()
            udp.close()
            os.close(ns_fd)
            raise
        attachment = NetAttachment(ns_fd, inode, tcp, udp, steering)
        try:
            in_netns(sandbox_ns_fd, _setup_sandbox_side, what=f"/proc/{init_pid}/ns/net")
        except BaseException:
            attachment.close()
            raise
        return attachment
    finally:
        os.close(sandbox_ns_fd)


#: The program that makes a rootless sandbox's sockets (see its docstring for why a program).
_SOCKETS_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "egress_sockets.py")
#: Ports a rootless sandbox reaches through the explicit proxy: HTTP and HTTPS.
ROOTLESS_PORTS = (80, 443)
#: What a rootless sandbox's egress runs without (its notes: stderr of `corral run`, inspect).
ROOTLESS_NOTE = (f"egress through the HTTP proxy only (HTTP_PROXY=http://{GATEWAY}:{PROXY_PORT}"
                 f" and DNS): no transparent steering without root (BPF sk_lookup), so a "
                 f"program that ignores the proxy cannot connect (ENETUNREACH)")


def rootless_rule_problem(rules) -> str | None:
    """Why rules cannot be served rootless (naming the first such rule), or None.

    A rule with a port other than 80 or 443 is for a client speaking its own protocol to
    that port, which only transparent steering would carry (a proxy-aware client reaches
    any port of a rule without one, through CONNECT).
    """
    for rule in rules:
        if rule.port is not None and rule.port not in ROOTLESS_PORTS:
            return (f"rule {str(rule)!r}: an unprivileged sandbox reaches the network only "
                    f"through the HTTP proxy at http://{GATEWAY}:{PROXY_PORT} (HTTP_PROXY, "
                    f"HTTPS_PROXY); a client of port {rule.port} needs transparent steering, "
                    f"a BPF sk_lookup program, which needs CAP_BPF and CAP_NET_ADMIN on the "
                    f"host; allow port 80 or 443 (or no port), or run as root")
    return None


def _open_namespace(init_pid: int, kind: str) -> int:
    path = f"/proc/{init_pid}/ns/{kind}"
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SandboxSetupError("open", path, exc.errno) from None


def attach_rootless(init_pid: int) -> NetAttachment:
    """The proxy's sockets inside the sandbox's own network namespace, made by a fresh
    process that joins the sandbox's user namespace (egress_sockets.py); no egress
    namespace, no link, no steering.

    Raises:
        SandboxSetupError: a namespace, address or bind step failed (step named).
    """
    userns = _open_namespace(init_pid, "user")
    netns = reply = theirs = None
    try:
        netns = _open_namespace(init_pid, "net")
        reply, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ran = subprocess.run(
                [sys.executable, "-I", "-S", _SOCKETS_PROGRAM, str(userns), str(netns),
                 str(theirs.fileno()), GATEWAY, str(PROXY_PORT), str(DNS_PORT)],
                pass_fds=(userns, netns, theirs.fileno()), env={}, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SandboxSetupError("egress sockets", _SOCKETS_PROGRAM,
                                    getattr(exc, "errno", None) or errno_mod.ETIMEDOUT) from None
        theirs.close()
        reply.setblocking(False)
        try:
            message, fds, _flags, _addr = socket.recv_fds(reply, 512, 2)
        except BlockingIOError:
            message, fds = b"", []
        return _rootless_attachment(message, fds, netns, ran)
    finally:
        for fd in (userns, netns):
            if fd is not None:
                os.close(fd)
        for sock in (reply, theirs):
            if sock is not None:
                sock.close()


def _rootless_attachment(message: bytes, fds: list[int], netns: int,
                         ran: subprocess.CompletedProcess) -> NetAttachment:
    """The NetAttachment of egress_sockets.py's reply, or its failure as an error."""
    if message == b"ok" and len(fds) == 2:
        tcp, udp = (socket.socket(fileno=fd) for fd in fds)
        for sock in (tcp, udp):  # served from the proxy's event loop
            sock.setblocking(False)
        return NetAttachment(-1, os.fstat(netns).st_ino, tcp, udp, None)
    for fd in fds:
        os.close(fd)
    text = message.decode(errors="replace")
    if text.startswith("error "):
        step, _, code = text[len("error "):].rpartition(" ")
        raise SandboxSetupError(step, "sandbox network namespace", int(code))
    said = ran.stderr.decode(errors="replace").strip().splitlines()
    raise SandboxSetupError("egress sockets", _SOCKETS_PROGRAM, errno_mod.EIO,
                            f"it exited with {ran.returncode}"
                            + (f": {said[-1]}" if said else ""))


def interfaces(ns_fd: int) -> dict:
    """Links (name, state, addresses) and IPv4 routes of a network namespace (for inspect)."""

    def read():
        with _ipr() as ipr:
            links = {}
            for link in ipr.get_links():
                links[link["index"]] = {
                    "name": link.get_attr("IFLA_IFNAME"),
                    "state": link.get_attr("IFLA_OPERSTATE") or "",
                    "kind": (link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") or ""),
                    "addresses": [],
                }
            for addr in ipr.get_addr():
                entry = links.get(addr["index"])
                if entry is not None:
                    entry["addresses"].append(
                        f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}")
            routes = []
            for r in ipr.get_routes(family=socket.AF_INET, table=254):
                dst = r.get_attr("RTA_DST")
                oif = r.get_attr("RTA_OIF")
                routes.append({
                    "dst": f"{dst}/{r['dst_len']}" if dst else "default",
                    "gateway": r.get_attr("RTA_GATEWAY") or "",
                    "dev": links.get(oif, {}).get("name", "") if oif else "",
                })
            return {"links": sorted(links.values(), key=lambda e: e["name"]), "routes": routes}

    return in_netns(ns_fd, read)


class EgressLink:
    """A sandbox's egress: its attachment plus its registration with the process's proxy."""

    def __init__(self, sandbox_id: str, attachment: NetAttachment, proxy):
        self.sandbox_id = sandbox_id
        self.attachment = attachment
        self.proxy = proxy
        #: The memfd the proxy writes the sandbox's DNS pins to (live restore), or -1.
        self.pins_fd = -1

    def keep_pins(self, fd: int) -> None:
        """From now on the proxy writes this sandbox's DNS pins to the memfd fd (owned
        here from now on; its holder's copy outlives us): the next daemon reads them."""
        old, self.pins_fd = self.pins_fd, fd
        try:
            self.proxy.keep_pins(self.sandbox_id, _pin_writer(fd))
        finally:
            if old >= 0:
                os.close(old)

    @property
    def egress_ns_inode(self) -> int:
        return self.attachment.egress_ns_inode

    def rebind(self, allow_net, on_event=None, secrets=None) -> None:
        """Put the link under other rules, listener and secrets (EgressProxy.rebind: a warm
        pool's sandbox taken by a request); the same checks as open_egress.

        Raises:
            UnsupportedHost: a rule only transparent steering serves, on a rootless link.
            FailedPrecondition: the link was used already (EgressProxy.rebind).
        """
        from .proxy import EgressPolicy

        policy = EgressPolicy(allow_net, self.proxy.config)
        if self.attachment.steering is None:  # rootless: the explicit proxy only
            problem = rootless_rule_problem(policy.rules)
            if problem is not None:
                raise UnsupportedHost(f"allow_net: {problem}")
        self.proxy.rebind(self.sandbox_id, policy, on_event, secrets=secrets)

    def close(self) -> None:
        """End the sandbox's connections (reported), then remove the link. Idempotent.

        Never raises: it runs inside a sandbox's teardown, which must go on to the cgroup
        and directories whatever the proxy does. Closing the attachment alone already cuts
        the sandbox off (its namespace and link go with the last reference).
        """
        try:
            self.proxy.unregister(self.sandbox_id)
        except Exception as exc:  # a hung or stopped proxy loop: report, cut off anyway
            logging.getLogger("corral.net").warning(
                "egress of %s: the proxy did not end its connections: %s", self.sandbox_id, exc)
        finally:
            self.attachment.close()
            if self.pins_fd >= 0:  # no pin is written after unregister
                os.close(self.pins_fd)
                self.pins_fd = -1


def _served(sandbox_id: str, attachment: NetAttachment, allow_net, on_event,
            secrets, pins=None) -> EgressLink:
    """attachment registered with the process's proxy under allow_net (a rootless one,
    with no steering, refused for a rule only steering serves); closed on failure."""
    from .proxy import EgressPolicy, shared_proxy

    try:
        proxy = shared_proxy()
        policy = EgressPolicy(allow_net, proxy.config)
        if attachment.steering is None:
            problem = rootless_rule_problem(policy.rules)
            if problem is not None:
                raise UnsupportedHost(f"allow_net: {problem}")
        proxy.register(sandbox_id, attachment.tcp_listener, attachment.udp_sink, policy,
                       on_event, secrets=secrets, pins=pins)
    except BaseException:
        with contextlib.suppress(Exception):
            shared_proxy().unregister(sandbox_id)
        attachment.close()
        raise
    return EgressLink(sandbox_id, attachment, proxy)


def open_egress(sandbox_id: str, init_pid: int, allow_net, on_event=None,
                secrets=None, rootless: bool = False) -> EgressLink:
    """Link the sandbox to the process's egress proxy under its allow_net rules.

    Args:
        secrets: the sandbox's SecretSet (sandbox/secrets.py): the proxy then scans what
            it sends and intercepts its secrets' hosts; None for none.
        rootless: the caller is unprivileged: the explicit proxy only (attach_rootless).

    Raises:
        SandboxSetupError, UnsupportedHost: see attach(); UnsupportedHost also for a
            rule that only transparent steering could serve, rootless.
    """
    from .proxy import EgressPolicy, shared_proxy

    if rootless:  # refused before anything is made
        problem = rootless_rule_problem(EgressPolicy(allow_net, shared_proxy().config).rules)
        if problem is not None:
            raise UnsupportedHost(f"allow_net: {problem}")
    attachment = attach_rootless(init_pid) if rootless else attach(init_pid)
    return _served(sandbox_id, attachment, allow_net, on_event, secrets)


# -- live restore: what outlives the daemon, and the link served again ----------------------
#
# A kept sandbox's egress is kernel objects only: the proxy's two sockets, the egress
# namespace (which holds the veth and its rules), the sockmap, program and sk_lookup link.
# The descriptor holder (runtime/holder.py) keeps a copy of each, after two memfds: a
# sealed one that says which is which (and holds the secrets' placeholders and CA), and
# one the proxy rewrites with the sandbox's DNS pins as they grow. A restarted daemon gets
# them back (adopt_kept) and serves them again (reopen_egress). Connections the dead
# daemon had accepted die with it; new ones wait in the listener's backlog until the next
# daemon accepts them.

#: The layout of a kept egress after its two memfds: root's and rootless.
KEPT_ROOT = ("tcp", "udp", "netns", "bpf-map", "bpf-prog", "bpf_link")
KEPT_ROOTLESS = ("tcp", "udp")
#: The description memfd and the pins memfd come first.
KEPT_HEAD = 2
#: The largest memfd read back or pins written (a few secrets and one CA; pins past this
#: are not kept: the last that fitted stay).
KEPT_MAX_BYTES = 1 << 20
_SEALS = ("F_SEAL_SEAL", "F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE")
_PINS_NAME = "corral-egress-pins"


@dataclass
class KeptEgress:
    """A kept egress taken back: its attachment, pins memfd (both owned) and secrets."""

    attachment: NetAttachment
    #: SecretSet.kept_state() of the sandbox's secrets (placeholders, CA), None without.
    secrets: dict | None
    #: address -> names the dead daemon's resolver gave the sandbox (DNS pinning).
    pins: dict[str, list[str]]
    pins_fd: int


def _pin_writer(fd: int):
    """The proxy's pin sink: the whole map rewritten into the memfd fd (a daemon killed
    mid-write leaves it unreadable, and the next one starts with no pins)."""

    def write(pins: dict) -> None:
        data = json.dumps({a: sorted(names) for a, names in pins.items()}).encode()
        if len(data) <= KEPT_MAX_BYTES:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))

    return write


def kept_descriptors(link: EgressLink, secrets=None) -> list[int]:
    """New descriptors for what another process needs to serve link's sandbox (live
    restore): a sealed memfd describing the rest (and secrets' kept_state(): placeholders
    and CA, never a value), a memfd the proxy keeps the DNS pins in from now on, then the
    sockets, namespace and BPF objects. The caller hands them on and closes them."""
    import fcntl

    att = link.attachment
    socks = [att.tcp_listener.fileno(), att.udp_sink.fileno()]
    rest = [att.egress_ns_fd, *att.steering.descriptors()] if att.steering else []
    description = json.dumps({
        "version": 1, "fds": KEPT_ROOT if att.steering else KEPT_ROOTLESS,
        "netns_inode": att.egress_ns_inode,
        "secrets": secrets.kept_state() if secrets else None}).encode()
    fds = [os.memfd_create("corral-egress", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)]
    try:
        os.write(fds[0], description)
        seals = 0
        for name in _SEALS:
            seals |= getattr(fcntl, name)
        fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, seals)  # nobody changes it from here on
        fds.append(os.memfd_create(_PINS_NAME, os.MFD_CLOEXEC))
        fds += [os.dup(fd) for fd in socks + rest]
        link.keep_pins(os.dup(fds[1]))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def adopt_kept(fds: list[int]) -> KeptEgress:
    """The egress kept_descriptors() described, from the descriptors a holder gave back
    (this function owns them: on failure every one is closed).

    Raises:
        SandboxSetupError: a descriptor is not what the description says (step named).
    """
    opened: list = list(fds)
    try:
        description = _kept_description(fds)
        names, inode = description["fds"], description["netns_inode"]
        _expect(fds[1], f"/memfd:{_PINS_NAME} (deleted)", "pins")
        for i, kind in ((KEPT_HEAD, socket.SOCK_STREAM), (KEPT_HEAD + 1, socket.SOCK_DGRAM)):
            opened[i] = _kept_socket(fds[i], inode, kind, names[i - KEPT_HEAD])
        for fd, name in zip(fds[KEPT_HEAD + 2:], names[2:], strict=True):
            _expect(fd, f"net:[{inode}]" if name == "netns" else f"anon_inode:{name}", name)
        tcp, udp = opened[KEPT_HEAD:KEPT_HEAD + 2]
        steering = SkLookup.adopt(*fds[-3:]) if len(names) == len(KEPT_ROOT) else None
        attachment = NetAttachment(fds[KEPT_HEAD + 2] if steering else -1, inode, tcp, udp,
                                   steering)
        os.close(fds[0])
        return KeptEgress(attachment, description.get("secrets"), _kept_pins(fds[1]), fds[1])
    except BaseException:
        for item in opened:
            with contextlib.suppress(OSError):
                item.close() if isinstance(item, socket.socket) else os.close(item)
        raise


def _expect(fd: int, want: str, name: str) -> None:
    if os.readlink(f"/proc/self/fd/{fd}") != want:
        raise SandboxSetupError("live restore", f"kept {name}", errno_mod.EBADF,
                                f"descriptor {fd} is not {want}")


def _kept_description(fds: list[int]) -> dict:
    """The first memfd's description, checked against how many descriptors came with it."""
    try:
        description = json.loads(os.pread(fds[0], KEPT_MAX_BYTES, 0))
        names = tuple(description["fds"])
        int(description["netns_inode"])
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise SandboxSetupError("live restore", "kept egress description", errno_mod.EINVAL,
                                str(exc) or type(exc).__name__) from None
    if names not in (KEPT_ROOT, KEPT_ROOTLESS) or len(fds) != KEPT_HEAD + len(names):
        raise SandboxSetupError("live restore", "kept egress description", errno_mod.EINVAL,
                                f"{len(fds) - KEPT_HEAD} descriptors for {list(names)}")
    return description


def _kept_pins(fd: int) -> dict[str, list[str]]:
    """The DNS pins in the pins memfd; {} when it cannot be read whole (a write cut off)."""
    try:
        pins = json.loads(os.pread(fd, KEPT_MAX_BYTES, 0) or b"{}")
        if isinstance(pins, dict) and all(isinstance(n, list) for n in pins.values()):
            return {str(a): [str(n) for n in names] for a, names in pins.items()}
    except (OSError, ValueError):
        pass
    logging.getLogger("corral.net").warning("live restore: DNS pins unreadable; none kept")
    return {}


def _kept_socket(fd: int, inode: int, kind: int, name: str) -> socket.socket:
    """A kept socket of the egress namespace (inode): its type and namespace checked."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SandboxSetupError("live restore", f"kept {name}", exc.errno) from None
    problem = ""
    if sock.type != kind or sock.family != socket.AF_INET:
        problem = f"descriptor {fd} is not an IPv4 {name} socket"
    elif kind == socket.SOCK_STREAM and not sock.getsockopt(socket.SOL_SOCKET,
                                                            socket.SO_ACCEPTCONN):
        problem = f"descriptor {fd} does not listen"
    elif socket_netns_inode(sock) != inode:
        problem = f"descriptor {fd} is not in network namespace {inode}"
    if problem:
        sock.detach()  # still in the caller's list: closed there
        raise SandboxSetupError("live restore", f"kept {name}", errno_mod.EBADF, problem)
    sock.setblocking(False)  # served from the proxy's event loop
    return sock


def reopen_egress(sandbox_id: str, kept: KeptEgress, allow_net, on_event=None,
                  secrets=None) -> EgressLink:
    """Serve a kept egress again under allow_net (the sandbox's spec): the link a dead
    daemon made, with the same sockets, namespace, steering and DNS pins, registered with
    this process's proxy, which keeps the pins in the same memfd from now on. The
    attachment and memfd are closed on failure.

    Raises:
        UnsupportedHost, InvalidSpec: as open_egress for the rules.
    """
    try:
        link = _served(sandbox_id, kept.attachment, allow_net, on_event, secrets,
                       pins=kept.pins)
    except BaseException:
        os.close(kept.pins_fd)
        raise
    try:
        link.keep_pins(kept.pins_fd)
    except BaseException:
        link.close()
        raise
    return link


def relink_kept(sandbox_id: str, fds: list[int], allow_net, bindings=(),
                secret_values=None, on_event=None):
    """An adopted sandbox's kept egress served again (live restore): its descriptors as
    the holder gave them back (owned here), its spec's allow_net and secret bindings, and
    the secrets' values read again from the store. Returns (EgressLink, its SecretSet or
    None): the same placeholders and CA as before, so its environment and trust hold.

    Raises:
        SandboxSetupError: nothing was kept, or a descriptor is not what it was.
        InvalidSpec: on field "secrets": a value is missing now, or what was kept of them.
        UnsupportedHost: as open_egress.
    """
    from .errors import InvalidSpec
    from .secrets import SecretSet

    if not fds:
        raise SandboxSetupError("live restore", "kept egress", errno_mod.ENOENT,
                                "the holder kept no egress descriptors")
    kept = adopt_kept(fds)
    secrets = None
    if bindings:
        try:
            if kept.secrets is None:
                raise InvalidSpec("secrets", "their placeholders and CA were not kept")
            secrets = SecretSet.restored(bindings, secret_values or {}, kept.secrets)
        except BaseException:
            kept.attachment.close()
            os.close(kept.pins_fd)
            raise
    return reopen_egress(sandbox_id, kept, allow_net, on_event, secrets), secrets
