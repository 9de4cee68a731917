"""Egress rules, decisions and the sniffers of sandbox/proxy.py (pure: no sockets, no root)."""

from __future__ import annotations

import ssl

import pytest

from corral.sandbox import InvalidSpec, SandboxSpec
from corral.sandbox.proxy import (
    NEED_MORE,
    QTYPE_A,
    RCODE_NXDOMAIN,
    EgressConfig,
    EgressPolicy,
    HttpHead,
    build_dns_query,
    build_dns_response,
    parse_dns_query,
    parse_hosts,
    parse_http_head,
    parse_rule,
    parse_sni,
    split_host_port,
)


@pytest.mark.parametrize("text, canonical, kind", [
    ("example.com", "example.com", "name"),
    ("Example.COM.:443", "example.com:443", "name"),
    ("*.pypi.org", "*.pypi.org", "wildcard"),
    ("*.test:8080", "*.test:8080", "wildcard"),
    ("203.0.113.7", "203.0.113.7", "address"),
    ("203.0.113.7:22", "203.0.113.7:22", "address"),
    ("10.0.0.0/8", "10.0.0.0/8", "address"),
    ("10.0.0.0/8:443", "10.0.0.0/8:443", "address"),
])
def test_rules_parse_to_a_canonical_form(text, canonical, kind):
    rule = parse_rule(text)
    assert (str(rule), rule.kind) == (canonical, kind)


@pytest.mark.parametrize("text, message", [
    ("", r"^allow_net: an empty rule"),
    ("example.com:0", r"^allow_net: 'example.com:0': port '0' is not 1-65535"),
    ("example.com:http", r"port 'http' is not 1-65535"),
    ("10.0.0.1/8", r"not an address or network"),
    ("300.1.1.1", r"not an address or network"),
    ("*", r"not a host name"),
    ("a.*.com", r"not a host name"),
    ("exa mple.com", r"not a host name"),
    ("[::1", r"missing '\]'"),
    ("[2001:db8::1]:443", r"^allow_net: '\[2001:db8::1\]:443': IPv6 egress is not supported"),
    ("2001:db8::/32", r"IPv6 egress is not supported"),
])
def test_bad_rules_name_the_problem(text, message):
    with pytest.raises(InvalidSpec, match=message):
        parse_rule(text)


def test_spec_validates_and_normalizes_allow_net():
    spec = SandboxSpec.build(allow_net=["Example.com", "example.com", "10.1.0.0/16:80"])
    assert spec.allow_net == ("10.1.0.0/16:80", "example.com")  # canonical, sorted
    env = dict(e.split("=", 1) for e in spec.environment())
    assert env["https_proxy"] == "http://100.127.255.1:3128"
    assert "https_proxy" not in dict(e.split("=", 1) for e in SandboxSpec().environment())
    with pytest.raises(InvalidSpec, match=r"^allow_net: 'bad host!'"):
        SandboxSpec.build(allow_net=["bad host!"])


def policy(*rules, **cfg):
    return EgressPolicy(rules, EgressConfig(**cfg))


def test_name_rules_allow_names_not_raw_addresses():
    p = policy("api.example.com:443", "*.pypi.org")
    assert p.decide(443, name="api.example.com", resolved=["93.184.216.34"]).allowed
    assert not p.decide(80, name="api.example.com", resolved=["93.184.216.34"]).allowed
    assert p.decide(80, name="files.pypi.org", resolved=["151.101.0.223"]).allowed
    assert not p.decide(80, name="pypi.org", resolved=["151.101.0.223"]).allowed
    d = p.decide(443, dst="93.184.216.34")
    assert (d.allowed, d.reason) == (False, "no rule allows 93.184.216.34:443")


def test_forged_name_is_denied_in_transparent_mode():
    p = policy("good.example")
    d = p.decide(80, name="good.example", dst="198.51.100.9", resolved=["93.184.216.34"])
    assert not d.allowed
    assert d.reason == "198.51.100.9 is not an address of good.example (forged name)"
    assert p.decide(80, name="good.example", dst="93.184.216.34",
                    resolved=["93.184.216.34"]).allowed


@pytest.mark.parametrize("address, kind", [
    ("169.254.169.254", "link-local"), ("127.0.0.1", "loopback"), ("10.1.2.3", "private"),
    ("192.168.1.1", "private"), ("224.0.0.1", "multicast"),
])
def test_names_never_lead_to_non_public_addresses_by_default(address, kind):
    d = policy("x.example").decide(80, name="x.example", resolved=[address])
    assert not d.allowed
    assert d.reason == f"{address} is a non-public address ({kind})"


def test_address_rules_and_routable_ranges_lift_the_default_deny():
    assert policy("x.example", "10.0.0.0/8").decide(
        80, name="x.example", resolved=["10.1.2.3"]).allowed
    p = policy("x.example", routable=(__import__("ipaddress").ip_network("10.0.0.0/8"),))
    assert p.decide(80, name="x.example", resolved=["10.1.2.3"]).allowed
    # routable does not allow raw connections: only name rules may lead there
    assert not p.decide(80, dst="10.1.2.3").allowed


def test_protected_endpoints_win_over_every_rule():
    p = policy("127.0.0.0/8", "0.0.0.0/0", protected={("127.0.0.1", 7443), ("", 9000)})
    assert not p.decide(7443, dst="127.0.0.1").allowed
    assert not p.decide(9000, dst="8.8.8.8").allowed
    assert not p.decide(3128, dst="100.127.255.1").allowed  # the proxy itself
    assert p.decide(7444, dst="127.0.0.1").allowed


def test_dns_answers_only_reachable_addresses():
    p = policy("x.example")
    assert p.name_allowed("x.example") and not p.name_allowed("y.example")
    assert p.dns_answers("x.example", ["93.184.216.34", "169.254.169.254"]) == [
        "93.184.216.34"]


def client_hello(name: str) -> bytes:
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_sni_whole_byte_by_byte_and_with_trailing_data():
    hello = client_hello("api.example.com")
    assert parse_sni(hello) == "api.example.com"
    assert parse_sni(hello + b"garbage") == "api.example.com"
    for cut in range(len(hello)):
        assert parse_sni(hello[:cut]) is NEED_MORE, cut
    assert parse_sni(b"GET / HTTP/1.1\r\n") is None


def test_http_head_whole_split_and_malformed():
    raw = b"GET http://a.example/x HTTP/1.1\r\nHost: a.example\r\nX: 1\r\n\r\nBODY"
    head = parse_http_head(raw)
    assert isinstance(head, HttpHead)
    assert (head.method, head.target, head.header("host"), raw[head.length:]) == (
        "GET", "http://a.example/x", "a.example", b"BODY")
    for cut in range(raw.index(b"\r\n\r\n") + 3):
        assert parse_http_head(raw[:cut]) is NEED_MORE, cut
    assert parse_http_head(b"\x16\x03\x01") is None
    assert parse_http_head(b"GET / SPDY/3\r\n\r\n") is None
    assert split_host_port("[::1]:8080", 80) == ("::1", 8080)
    assert split_host_port("a.example", 443) == ("a.example", 443)
    assert split_host_port("a.example:99999", 80) is None


def test_dns_round_trip():
    q = parse_dns_query(build_dns_query("Allowed.Test", QTYPE_A, qid=77))
    assert (q.id, q.name, q.qtype) == (77, "allowed.test", QTYPE_A)
    reply = build_dns_response(q, 0, ["198.51.100.1", "198.51.100.2"])
    assert reply[:2] == (77).to_bytes(2, "big") and reply[7] == 2  # two answers
    assert build_dns_response(q, RCODE_NXDOMAIN)[3] & 0xF == RCODE_NXDOMAIN
    assert parse_dns_query(b"\x00" * 5) is None
    assert parse_dns_query(reply) is None  # a response is not a query


def test_hosts_file():
    assert parse_hosts("# c\n10.0.0.1 a.test B.test\n::1 v6.test\n10.0.0.2 a.test\n") == {
        "a.test": ("10.0.0.1", "10.0.0.2"), "b.test": ("10.0.0.1",)}


def test_docker_backend_refuses_allow_net():
    with pytest.raises(InvalidSpec, match=r"^allow_net: only the native backend has an egress"):
        SandboxSpec(allow_net=("a.test",), backend="docker")


def test_config_from_environment(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("10.9.0.1 api.test\n")
    cfg = EgressConfig.from_env({"CORRAL_EGRESS_HOSTS": str(hosts),
                                 "CORRAL_EGRESS_ROUTABLE": "10.9.0.0/16, 192.168.7.0/24"})
    assert cfg.hosts == {"api.test": ("10.9.0.1",)}
    assert [str(n) for n in cfg.routable] == ["10.9.0.0/16", "192.168.7.0/24"]
    assert EgressConfig.from_env({}).upstream_only == ()
    with pytest.raises(InvalidSpec, match=r"^CORRAL_EGRESS_ROUTABLE: 'nope' is not a network$"):
        EgressConfig.from_env({"CORRAL_EGRESS_ROUTABLE": "nope"})


def test_protect_normalizes_wildcards_and_names():
    from corral.sandbox.proxy import EgressProxy

    p = EgressProxy(EgressConfig())
    p.protect("0.0.0.0", 7070)
    p.protect("localhost", 7071)
    p.protect("[::1]", 7072)
    p.protect("127.0.0.1", 7073)
    assert p.config.protected == {("", 7070), ("", 7071), ("::1", 7072), ("127.0.0.1", 7073)}
    pol = EgressPolicy(["0.0.0.0/0"], p.config)
    assert not pol.decide(7070, dst="93.184.216.34").allowed
    assert not pol.decide(7073, dst="127.0.0.1").allowed
    assert pol.decide(7074, dst="93.184.216.34").allowed


def test_sk_lookup_program_shape():
    """24 instructions, the map fd in the 64-bit load, every jump inside the program, and
    the only exit last (the kernel verifier checks more; tests/egress load it for real)."""
    import struct

    from corral.sandbox.net import sk_lookup_program

    prog = sk_lookup_program(77)
    insns = [struct.unpack_from("<BBhi", prog, i) for i in range(0, len(prog), 8)]
    assert len(insns) == 24
    assert insns[11] == (0x18, 0x11, 0, 77)  # r1 = map fd 77 (src = BPF_PSEUDO_MAP_FD)
    for i, (code, _regs, off, _imm) in enumerate(insns):
        if code in (0x15, 0x55):  # conditional jumps
            assert 0 <= i + 1 + off < len(insns) and insns[i + 1 + off][0] in (0x63, 0xB7)
    assert [i for i, insn in enumerate(insns) if insn[0] == 0x95] == [23]


def test_the_link_constants_agree():
    from corral.sandbox import mounts, net, proxy

    assert (proxy.GATEWAY, proxy.PROXY_PORT, proxy.DNS_PORT) == (
        net.GATEWAY, net.PROXY_PORT, net.DNS_PORT)
    assert str(proxy.LINK_NET) == f"{net.GATEWAY[:-1]}0/{net.PREFIX_LEN}"
    etc = mounts.etc_files(SandboxSpec(allow_net=("a.test",)))
    assert etc["resolv.conf"].splitlines()[0] == f"nameserver {net.GATEWAY}"
    assert mounts.etc_files(SandboxSpec())["resolv.conf"] == ""


def test_upstream_only_confines_every_allowed_decision():
    import ipaddress

    p = policy("x.example", "0.0.0.0/0",
               upstream_only=(ipaddress.ip_network("198.51.100.0/24"),))
    assert p.decide(80, dst="198.51.100.7").allowed
    d = p.decide(80, dst="93.184.216.34")
    assert (d.allowed, d.reason) == (
        False, "93.184.216.34 is outside the operator's upstream networks")
    assert not p.decide(80, name="x.example", resolved=["93.184.216.34"]).allowed
