"""A program, not a module: makes a rootless sandbox's egress sockets inside its namespaces.

Run by sandbox/net.py (`attach_rootless`) as `python -I -S egress_sockets.py USERNS NETNS
REPLY ADDRESS PROXY_PORT DNS_PORT`: three inherited descriptors (the sandbox's user
namespace, its network namespace, one end of a SOCK_SEQPACKET pair) and where to listen.
It joins both namespaces, puts the egress gateway address on the sandbox's loopback,
makes the explicit proxy's TCP listener and the DNS UDP socket there, and sends both
descriptors back with SCM_RIGHTS. Then it exits; the proxy serves the sockets from the
host network namespace.

Why a separate program: setns(CLONE_NEWUSER) refuses a multi-threaded caller, and the
runtime (the daemon above all) has threads, so forking it and running Python in the child
is unsafe; a fresh interpreter exec'd from it (subprocess: no Python runs between fork and
exec) is single-threaded. Standard library only, so `-S` keeps its start short.

Reply: b"ok" with the two descriptors, or b"error STEP ERRNO" naming the step that failed.
"""

import ctypes
import errno
import socket
import struct
import sys

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_RTM_NEWADDR, _NLMSG_ERROR = 20, 2
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_EXCL, _NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_IP_RECVORIGDSTADDR = 20


class StepFailed(Exception):
    def __init__(self, step: str, err: int):
        super().__init__(step, err)
        self.step = step
        self.err = err


def _join(libc, fd: int, nstype: int, step: str) -> None:
    if libc.setns(fd, nstype) != 0:
        raise StepFailed(step, ctypes.get_errno())


def _rtattr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload


def add_loopback_address(address: str) -> None:
    """RTM_NEWADDR address/32 on lo (rtnetlink, no library): the proxy binds it."""
    packed = socket.inet_aton(address)
    body = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, socket.if_nametoindex("lo"))
    body += _rtattr(_IFA_LOCAL, packed) + _rtattr(_IFA_ADDRESS, packed)
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_EXCL | _NLM_F_CREATE
    message = struct.pack("=IHHII", 16 + len(body), _RTM_NEWADDR, flags, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as nl:
        nl.sendall(message)
        reply = nl.recv(4096)
    kind = struct.unpack_from("=H", reply, 4)[0]
    code = struct.unpack_from("=i", reply, 16)[0] if kind == _NLMSG_ERROR else -errno.EPROTO
    if code != 0:
        raise StepFailed("RTM_NEWADDR lo", -code)


def make_sockets(address: str, proxy_port: int, dns_port: int) -> tuple[socket.socket, ...]:
    """The explicit proxy's listener and the resolver's UDP socket, on address."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        # no SO_REUSEADDR/SO_REUSEPORT: nothing in the sandbox may bind beside them
        step = f"bind {address}:{proxy_port}"
        tcp.bind((address, proxy_port))
        tcp.listen(1024)
        step = f"bind {address}:{dns_port}/udp"
        udp.setsockopt(socket.SOL_IP, _IP_RECVORIGDSTADDR, 1)
        udp.bind((address, dns_port))
    except OSError as exc:
        tcp.close()
        udp.close()
        raise StepFailed(step, exc.errno or errno.EIO) from None
    return tcp, udp


def main(argv: list[str]) -> int:
    userns, netns, reply_fd = (int(a) for a in argv[1:4])
    address, proxy_port, dns_port = argv[4], int(argv[5]), int(argv[6])
    reply = socket.socket(fileno=reply_fd)
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        _join(libc, userns, CLONE_NEWUSER, "setns(CLONE_NEWUSER)")
        _join(libc, netns, CLONE_NEWNET, "setns(CLONE_NEWNET)")
        add_loopback_address(address)
        tcp, udp = make_sockets(address, proxy_port, dns_port)
    except StepFailed as exc:
        reply.send(f"error {exc.step} {exc.err}".encode())
        return 1
    except OSError as exc:
        reply.send(f"error egress-sockets {exc.errno or errno.EIO}".encode())
        return 1
    socket.send_fds(reply, [b"ok"], [tcp.fileno(), udp.fileno()])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
