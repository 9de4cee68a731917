"""Egress rule 4a (sandbox/proxy.py): this host is never a destination by accident.

Linux connects 0.0.0.0 (and the whole 0.0.0.0/8, and ::) to the local host, and every
address of the host reaches listeners bound to 0.0.0.0. Issue 18 reached the daemon's
"always refused" port with allow_net=["0.0.0.0/0"] and CONNECT 0.0.0.0:PORT.
"""

from __future__ import annotations

import pytest

from corral.sandbox.proxy import EgressConfig, EgressPolicy, host_local, judged_address

DAEMON = 7070


def policy(*rules, **cfg):
    cfg.setdefault("protected", {("127.0.0.1", DAEMON)})
    return EgressPolicy(rules, EgressConfig(**cfg))


@pytest.mark.parametrize("given, judged", [
    ("0.0.0.0", "127.0.0.1"), ("0.1.2.3", "127.0.0.1"), ("::", "::1"),
    ("::ffff:127.0.0.1", "127.0.0.1"), ("::ffff:0.0.0.0", "127.0.0.1"),
    ("::ffff:93.184.216.34", "93.184.216.34"), ("93.184.216.34", "93.184.216.34"),
    ("127.0.0.5", "127.0.0.5"),
])
def test_addresses_are_judged_as_what_connect_reaches(given, judged):
    assert str(judged_address(given)) == judged


@pytest.mark.parametrize("dst", ["0.0.0.0", "0.0.0.7", "127.0.0.1", "127.1.2.3",
                                 "::ffff:127.0.0.1", "::ffff:0.0.0.0"])
def test_the_daemon_port_is_refused_through_every_spelling_of_this_host(dst):
    d = policy("0.0.0.0/0", "127.0.0.0/8").decide(DAEMON, dst=dst)
    assert (d.allowed, d.reason) == (False, f"{judged_address(dst)}:{DAEMON} is a protected "
                                            "endpoint")


@pytest.mark.parametrize("rule", ["0.0.0.0/0", "0.0.0.0/8", "0.0.0.0", "0.0.0.0:6379",
                                  "100.64.0.0/10"])
def test_wide_or_unspecified_rules_never_reach_loopback(rule):
    p = policy(rule)
    for dst in ("0.0.0.0", "127.0.0.1"):
        d = p.decide(6379, dst=dst)
        assert (d.allowed, d.reason) == (False, "no rule allows 127.0.0.1:6379")


def test_a_rule_naming_loopback_reaches_it_and_the_proxy_connects_where_it_judged():
    d = policy("127.0.0.1:6379").decide(6379, dst="0.0.0.0")
    assert (d.allowed, d.address) == (True, "127.0.0.1")
    assert policy("127.0.0.0/8").decide(6379, dst="::ffff:127.0.0.1").address == "127.0.0.1"


def test_names_resolving_to_this_host_are_refused_even_under_a_wide_rule():
    p = policy("evil.example", "0.0.0.0/0")
    for answer in ("0.0.0.0", "127.0.0.1"):
        d = p.decide(6379, name="evil.example", resolved=[answer])
        assert (d.allowed, d.reason) == (False, "127.0.0.1 is a non-public address (loopback)")
    d = p.decide(DAEMON, name="evil.example", resolved=["0.0.0.0"])
    assert d.reason == f"127.0.0.1:{DAEMON} is a protected endpoint"
    assert p.dns_answers("evil.example", ["0.0.0.0", "127.0.0.1", "93.184.216.34"]) == [
        "93.184.216.34"]


def test_the_host_own_addresses_need_a_rule_naming_them():
    own = "10.1.1.1"
    is_local = lambda a: str(a) == own  # noqa: E731
    wide = policy("10.0.0.0/8", "x.example", is_local=is_local,
                  routable=(__import__("ipaddress").ip_network("10.0.0.0/8"),))
    assert not wide.decide(22, dst=own).allowed
    assert wide.decide(22, dst="10.1.1.2").allowed
    d = wide.decide(22, name="x.example", resolved=[own])
    assert (d.allowed, d.reason) == (False, f"{own} is an address of this host")
    assert policy(own, is_local=is_local).decide(22, dst=own).allowed


def test_the_connected_peer_is_judged_again():
    p = policy("0.0.0.0/0", "127.0.0.1:6379")
    # a kernel rewrite (0.0.0.0 -> 127.0.0.1) or any other surprise: not what was decided
    assert p.peer_refusal("93.184.216.34", "127.0.0.1", "127.0.0.1", 80) == \
        "connected to 127.0.0.1, not 93.184.216.34"
    assert p.peer_refusal("127.0.0.1", "127.0.0.1", "127.0.0.1", 6379) is None
    assert p.peer_refusal("127.0.0.1", "127.0.0.1", "127.0.0.1", DAEMON) == \
        f"127.0.0.1:{DAEMON} is a protected endpoint"
    # delivered locally (our source address is the peer's): this host, unnamed
    assert p.peer_refusal("10.1.1.1", "10.1.1.1", "10.1.1.1", 22) == \
        "10.1.1.1 is an address of this host"
    assert p.peer_refusal("93.184.216.34", "93.184.216.34", "10.0.0.2", 443) is None


def test_host_local_asks_the_routing_table():
    assert host_local("127.0.0.1") and host_local("127.9.9.9") and host_local("0.0.0.0")
    assert not host_local("192.0.2.1")  # TEST-NET-1: routed away, or no route at all
