"""Tenant policy rules without a daemon: coverage of egress rules, limits, which policy applies."""

from __future__ import annotations

import pytest

from corral.runtime.auth import Caller
from corral.runtime.policy import (
    PolicyBook,
    PolicyDenied,
    QuotaExceeded,
    TenantPolicy,
    covers,
    is_public_rule,
)
from corral.sandbox.errors import InvalidSpec
from corral.sandbox.proxy import parse_rule
from corral.sandbox.spec import SandboxSpec


@pytest.mark.parametrize(("granted", "asked", "expected"), [
    ("example.com", "example.com", True),
    ("example.com", "example.com:443", True),
    ("example.com:443", "example.com", False),   # any port is more than 443
    ("example.com:443", "example.com:443", True),
    ("example.com", "api.example.com", False),
    ("*.example.com", "api.example.com", True),
    ("*.example.com", "*.api.example.com", True),
    ("*.example.com", "*.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "badexample.com", False),
    ("10.0.0.0/8", "10.1.2.0/24", True),
    ("10.0.0.0/8", "10.1.2.3", True),
    ("10.1.2.0/24", "10.0.0.0/8", False),
    ("10.0.0.0/8", "example.com", False),
    ("example.com", "93.184.216.34", False),
])
def test_covers(granted, asked, expected):
    assert covers(parse_rule(granted), parse_rule(asked)) is expected


@pytest.mark.parametrize(("rule", "public"), [
    ("example.com", True), ("*.example.com", True), ("8.8.8.8", True),
    ("8.8.0.0/16", True), ("0.0.0.0/0", False), ("0.0.0.0", False), ("127.0.0.1", False),
    ("169.254.169.254", False), ("172.20.0.0/16", False), ("100.64.0.1", False),
    ("224.0.0.1", False), ("10.0.0.0/7", False),  # 11/8 is public, 10/8 is not
])
def test_public_rules(rule, public):
    assert is_public_rule(parse_rule(rule)) is public


def test_default_refuses_non_public_and_operator_grant_allows():
    default = TenantPolicy()
    with pytest.raises(PolicyDenied, match=r"^spec\.allow_net: '127\.0\.0\.1:80' is not "
                                           r"allowed for this tenant: it reaches non-public"):
        default.check_net(["127.0.0.1:80"])
    granted = default.with_settings({"allow_net": ["public", "127.0.0.1/32:80"]}, "t")
    granted.check_net(["127.0.0.1:80", "example.com"])
    with pytest.raises(PolicyDenied, match=r"'127\.0\.0\.1:81'"):
        granted.check_net(["127.0.0.1:81"])
    closed = default.with_settings({"allow_net": ["api.example.com:443"]}, "t")
    with pytest.raises(PolicyDenied, match=r"no rule of the tenant's policy covers it$"):
        closed.check_net(["example.org"])


def test_limits_name_the_field_and_both_values():
    p = TenantPolicy(max_memory_bytes=1 << 30, max_pids=300, max_cpus=2.0,
                     max_tmp_bytes=256 << 20)
    cases = [
        (SandboxSpec(memory_bytes=3 << 29), r"^spec\.memory_bytes: 1\.5G is over this "
                                            r"tenant's limit of 1G$"),
        (SandboxSpec(pids_max=301), r"^spec\.pids_max: 301 is over this tenant's limit of 300$"),
        (SandboxSpec(cpus=2.5), r"^spec\.cpus: 2\.5 is over this tenant's limit of 2$"),
        (SandboxSpec(cpus=None), r"^spec\.cpus: no CPU quota is not allowed"),
        (SandboxSpec(tmp_bytes=1 << 30), r"^spec\.tmp_bytes: 1G is over this tenant's limit "
                                         r"of 256M$"),
        (SandboxSpec(profile="unconfined"), r"^spec\.profile: 'unconfined' is not allowed"),
    ]
    for spec, message in cases:
        with pytest.raises(PolicyDenied, match=message):
            p.check_sandbox(spec)
    with pytest.raises(InvalidSpec, match=r"^profile: no profile named 'planted'; this tenant "
                                          r"may use: default$"):
        p.check_sandbox(SandboxSpec(profile="planted"))
    p.check_sandbox(SandboxSpec(memory_bytes=1 << 30, pids_max=300, cpus=2.0))


def test_quota_is_a_denial_not_daemon_exhaustion():
    p = TenantPolicy(max_sandboxes=2)
    p.check_count("sandboxes", 1, "max_sandboxes")
    with pytest.raises(QuotaExceeded, match=r"^this tenant already has 2 sandboxes, the most "
                                            r"its policy allows \(sandboxes = 2\)$") as exc:
        p.check_count("sandboxes", 2, "max_sandboxes")
    assert exc.value.grpc_status == "RESOURCE_EXHAUSTED" and exc.value.denial
    TenantPolicy(max_sandboxes=None).check_count("sandboxes", 10**6, "max_sandboxes")


def test_which_policy_applies():
    book = PolicyBook.from_config({"max_sandboxes": 5}, {"acme": {"max_sandboxes": 9}},
                                  default_ttl_s=600.0, operators=("local", "ops"))
    assert book.of(Caller("acme", "x")).max_sandboxes == 9
    assert book.of(Caller("other", "x")).max_sandboxes == 5
    assert book.of(Caller("other", "x")).max_ttl_s == 600.0
    assert book.of(Caller("local", "x", operator=True)).max_sandboxes is None
    assert book.of_tenant("ops").max_sandboxes is None
    assert book.of_tenant("acme").max_sandboxes == 9
    assert book.of_tenant("stranger").profiles == ("default",)


def test_max_exposed_ports_key():
    book = PolicyBook.from_config({"max_exposed_ports": 2}, {"acme": {"max_exposed_ports": 0}},
                                  60.0)
    assert book.of(Caller("other", "x")).max_exposed_ports == 2
    assert book.of(Caller("acme", "x")).max_exposed_ports == 0
    assert book.of(Caller("local", "x", operator=True)).max_exposed_ports is None
    assert PolicyBook.from_config({}, {}, 60.0).default.max_exposed_ports == 16
    with pytest.raises(QuotaExceeded, match=r"already has 2 exposed ports, the most its policy "
                                            r"allows \(exposed_ports = 2\)"):
        book.of(Caller("other", "x")).check_count("exposed ports", 2, "max_exposed_ports")
    with pytest.raises(InvalidSpec, match=r"^policy\.max_exposed_ports: -1 must be a whole"):
        PolicyBook.from_config({"max_exposed_ports": -1}, {}, 60.0)


def test_bad_settings_are_named():
    with pytest.raises(InvalidSpec, match=r"^tenants\.acme\.max_ttl: 'forever' is not a duration"):
        PolicyBook.from_config({}, {"acme": {"max_ttl": "forever"}}, 60.0)
    with pytest.raises(InvalidSpec, match=r"^policy\.max_cpus: 0 must be a positive number"):
        PolicyBook.from_config({"max_cpus": 0}, {}, 60.0)


def test_request_rate_is_a_token_bucket(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("corral.runtime.policy.time.monotonic", lambda: now[0])
    book = PolicyBook.from_config({"max_request_rate": 10}, {}, 60.0)
    acme, local = Caller("acme", "x"), Caller("local", "x", operator=True)
    for _ in range(20):  # two seconds' worth may come at once
        book.charge(acme)
    with pytest.raises(QuotaExceeded, match=r"^this tenant is over its request rate \(10 a "
                                            r"second\); retry later$"):
        book.charge(acme)
    now[0] += 0.5  # five more have come back
    for _ in range(5):
        book.charge(acme)
    with pytest.raises(QuotaExceeded):
        book.charge(acme)
    for _ in range(1000):  # operators have no rate
        book.charge(local)
    book.charge(Caller("bob", "x"))  # every tenant has its own bucket


def test_host_dirs_grant_a_directory_and_what_is_below_it(tmp_path):
    granted = tmp_path / "projects"
    (granted / "app").mkdir(parents=True)
    (tmp_path / "projects-evil").mkdir()
    book = PolicyBook.from_config({}, {"acme": {"host_dirs": [str(granted)]}}, 60.0)
    acme = book.of(Caller("acme", "x"))
    assert acme.host_dirs == (str(granted),)
    acme.check_sandbox(SandboxSpec(workspace=str(granted)))
    acme.check_sandbox(SandboxSpec(workspace=str(granted / "app")))
    # a sibling sharing the prefix as text is not below it
    with pytest.raises(PolicyDenied, match=r"^spec\.workspace_dir: .*projects-evil.* is not "
                                           r"under a host directory this tenant may use"):
        acme.check_sandbox(SandboxSpec(workspace=str(tmp_path / "projects-evil")))
    # the default grants none; operators any
    with pytest.raises(PolicyDenied, match=r"\(host_dirs: none\)$"):
        book.of(Caller("other", "x")).check_sandbox(SandboxSpec(workspace=str(granted)))
    book.of(Caller("local", "x", operator=True)).check_sandbox(
        SandboxSpec(workspace=str(tmp_path)))
    with pytest.raises(InvalidSpec, match=r"^tenants\.acme\.host_dirs: must be a list of "
                                          r"absolute paths"):
        PolicyBook.from_config({}, {"acme": {"host_dirs": ["relative/dir"]}}, 60.0)


def test_snapshot_quotas_and_their_widenings():
    from corral.runtime.policy_files import tenant_widenings

    book = PolicyBook.from_config({"max_snapshots": 2, "max_snapshot_size": "1G"}, {}, 60.0)
    policy = book.of(Caller("other", "x"))
    assert (policy.max_snapshots, policy.max_snapshot_bytes) == (2, 1 << 30)
    assert PolicyBook.from_config({}, {}, 60.0).default.max_snapshots == 32
    wider = PolicyBook.from_config({"max_snapshots": 5, "host_dirs": ["/srv/a"]}, {}, 60.0)
    assert tenant_widenings("t", policy, wider.default) == [
        "t may now show host directory /srv/a at /workspace",
        "t may now hold max_snapshots = 5 (was 2)",
        "t may now hold max_snapshot_size = 8G (was 1G)",
    ]
