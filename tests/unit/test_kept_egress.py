"""What live restore keeps of a sandbox's egress and secrets (sandbox/net.py kept_descriptors,
adopt_kept; sandbox/secrets.py kept_state, restored), without root: the rootless layout on
sockets of this process's own network namespace, and a secret set made again from its
kept state."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import ssl

import pytest

from corral.sandbox import net
from corral.sandbox.errors import InvalidSpec, SandboxSetupError
from corral.sandbox.proxy import EgressConfig, EgressPolicy, EgressProxy
from corral.sandbox.secrets import SandboxCA, SecretSet
from corral.sandbox.spec import SecretBinding

BINDINGS = [SecretBinding("API_TOKEN", ("api.test",)), SecretBinding("B", ("*.b.test",))]
VALUES = {"API_TOKEN": b"sk-first-value-0123", "B": b"b-first-value-0123"}


@pytest.fixture
def rootless_link():
    """An egress link as attach_rootless makes one (two sockets, no steering), served by
    a proxy of its own; unregistered and closed at the end."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    inode = os.stat("/proc/self/ns/net").st_ino
    proxy = EgressProxy(EgressConfig())
    proxy.register("sbx-test", tcp, udp, EgressPolicy(["api.test:443"]), None)
    link = net.EgressLink("sbx-test", net.NetAttachment(-1, inode, tcp, udp, None), proxy)
    yield link
    link.close()


def test_a_kept_rootless_egress_comes_back_as_the_same_sockets(rootless_link):
    link = rootless_link
    address = link.attachment.tcp_listener.getsockname()
    secrets = SecretSet(BINDINGS, VALUES)
    fds = net.kept_descriptors(link, secrets)
    try:
        assert len(fds) == 4  # description, pins, listener, UDP sink
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL  # nobody rewrites it
        with pytest.raises(OSError):
            os.write(fds[0], b"x")
        description = json.loads(os.pread(fds[0], 1 << 20, 0))
        assert b"first-value" not in json.dumps(description).encode()  # never a value
        net._pin_writer(link.pins_fd)({"10.9.8.7": {"api.test"}})  # as the proxy does
        kept = net.adopt_kept(fds)
    finally:
        link.close()
    try:
        assert kept.pins == {"10.9.8.7": ["api.test"]}
        att = kept.attachment
        assert att.steering is None and att.egress_ns_fd == -1
        assert att.tcp_listener.getsockname() == address
        assert not att.tcp_listener.getblocking() and not att.udp_sink.getblocking()
        client = socket.create_connection(address, timeout=5)
        client.close()  # the listener we got back still listens (the first copy is closed)
        assert kept.secrets == secrets.kept_state()
    finally:
        att.close()
        os.close(kept.pins_fd)


def test_pins_cut_off_by_a_kill_mid_write_are_dropped_not_fatal(rootless_link):
    fds = net.kept_descriptors(rootless_link)
    os.pwrite(rootless_link.pins_fd, b'{"10.9.8.7": ["api.', 0)  # a write cut off
    kept = net.adopt_kept(fds)
    try:
        assert kept.pins == {}
    finally:
        kept.attachment.close()
        os.close(kept.pins_fd)


def test_kept_descriptors_that_do_not_match_their_description_are_refused_and_closed(
        rootless_link):
    link = rootless_link
    try:
        fds = net.kept_descriptors(link)
        fds[2], fds[3] = fds[3], fds[2]  # the UDP socket where the listener should be
        with pytest.raises(SandboxSetupError, match=r"^sandbox setup failed at live restore "
                           r"'kept tcp': EBADF .*\(descriptor \d+ is not an IPv4 tcp socket\)$"):
            net.adopt_kept(fds)
        for fd in fds:  # every one closed on the way out
            with pytest.raises(OSError):
                os.fstat(fd)
        short = net.kept_descriptors(link)
        os.close(short.pop())
        with pytest.raises(SandboxSetupError, match=r"\(1 descriptors for \['tcp', 'udp'\]\)$"):
            net.adopt_kept(short)
    finally:
        link.close()


def test_restored_secrets_keep_their_placeholders_and_ca_and_take_new_values():
    first = SecretSet(BINDINGS, VALUES)
    state = json.loads(json.dumps(first.kept_state()))  # as it went through the memfd
    again = SecretSet.restored(BINDINGS, {"API_TOKEN": b"sk-rotated-value-99", "B": VALUES["B"]},
                               state)
    assert [s.placeholder for s in again.secrets] == [s.placeholder for s in first.secrets]
    assert again.environment() == first.environment()
    assert again.ca.cert_pem == first.ca.cert_pem
    assert again.request_rewriter("api.test").whole(first.secrets[0].placeholder) == \
        b"sk-rotated-value-99"
    # a leaf the restored CA makes is trusted by what the sandbox holds: the first CA
    assert _handshake(again.ca.server_context("api.test"), first.ca.cert_pem) == "api.test"


def _handshake(server_ctx: ssl.SSLContext, trusted_pem: bytes) -> str:
    """A TLS handshake to server_ctx by a client trusting only trusted_pem, in memory;
    returns the common name of the certificate the client accepted."""
    client_ctx = ssl.create_default_context(cadata=trusted_pem.decode())
    bios = [ssl.MemoryBIO() for _ in range(4)]  # client in/out, server in/out
    client = client_ctx.wrap_bio(bios[0], bios[1], server_hostname="api.test")
    server = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(10):
        done = 0
        for end, out, peer_in in ((client, bios[1], bios[2]), (server, bios[3], bios[0])):
            try:
                end.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if done == 2:
            break
    subject = dict(item[0] for item in client.getpeercert()["subject"])
    return subject["commonName"]


def test_restoring_secrets_without_what_was_kept_is_refused_by_field():
    state = SecretSet(BINDINGS, VALUES).kept_state()
    with pytest.raises(InvalidSpec, match=r"^secrets: B has no value"):
        SecretSet.restored(BINDINGS, {"API_TOKEN": VALUES["API_TOKEN"]}, state)
    lacking = {**state, "placeholders": {"API_TOKEN": state["placeholders"]["API_TOKEN"]}}
    with pytest.raises(InvalidSpec, match=r"^secrets: B: its placeholder was not kept$"):
        SecretSet.restored(BINDINGS, VALUES, lacking)
    other_key = SandboxCA(["api.test"]).kept_pem()[1].decode()
    mismatched = {**state, "ca": [state["ca"][0], other_key]}
    with pytest.raises(InvalidSpec, match=r"^secrets: the sandbox's CA was not kept whole$"):
        SecretSet.restored(BINDINGS, VALUES, mismatched)
