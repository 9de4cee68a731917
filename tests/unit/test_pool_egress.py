"""runtime/pools.py egress classes: which requests a pool with `egress` serves, and the
spec its ready sandboxes are born with (no root: the spec rules only)."""

from __future__ import annotations

import pytest

from corral.runtime.config import DaemonConfig
from corral.runtime.pools import BIRTH_HOST, BIRTH_RULE, BIRTH_SECRET, pools_from_config
from corral.sandbox.errors import InvalidSpec
from corral.sandbox.secrets import MIN_VALUE_BYTES
from corral.sandbox.spec import SandboxSpec, SecretBinding

MiB = 1 << 20
CLASS = {"size": 1, "memory": "128M", "pids": 64}
TOKEN = SecretBinding("API_TOKEN", ("api.test",))


def pool(egress: str | None):
    table = {**CLASS, **({"egress": egress} if egress else {})}
    (made,) = pools_from_config({"p": table}, 3600.0)
    return made


def request(**kw) -> SandboxSpec:
    return SandboxSpec(memory_bytes=128 * MiB, pids_max=64, **kw)


REQUESTS = {
    "plain": request(),
    "env": request(env=(("A", "1"),)),
    "allow_net": request(allow_net=("example.com:443",)),
    "secrets": request(secrets=(TOKEN,)),
    "secrets and allow_net": request(secrets=(TOKEN,), allow_net=("example.com:443",)),
    "allow_net, other memory": SandboxSpec(memory_bytes=256 * MiB, pids_max=64,
                                           allow_net=("example.com:443",)),
    "secrets, other pids": SandboxSpec(memory_bytes=128 * MiB, pids_max=65, secrets=(TOKEN,)),
}
SERVED = {
    None: {"plain", "env"},
    "none": {"plain", "env"},
    "allow_net": {"allow_net"},
    "secrets": {"secrets", "secrets and allow_net"},
}


@pytest.mark.parametrize("egress", sorted(SERVED, key=str))
def test_a_pool_serves_the_requests_of_its_egress_class_only(egress):
    made = pool(egress)
    served = {name for name, spec in REQUESTS.items() if made.serves("t", spec, 60.0)}
    assert served == SERVED[egress]


def test_the_birth_spec_is_the_class_with_a_link_to_nowhere():
    plain, net, keyed = pool("none"), pool("allow_net"), pool("secrets")
    assert plain.birth() == (plain.template, None)
    spec, values = net.birth()
    assert (spec.allow_net, values) == ((BIRTH_RULE,), None)
    assert spec.secrets == ()
    spec, values = keyed.birth()
    assert spec.secrets == (SecretBinding(BIRTH_SECRET, (BIRTH_HOST,)),)
    assert spec.allow_net == (f"{BIRTH_HOST}:443", f"{BIRTH_HOST}:80")  # implied, as ever
    assert set(values) == {BIRTH_SECRET} and len(values[BIRTH_SECRET]) >= MIN_VALUE_BYTES
    assert keyed.birth()[1] != values  # a new value for every sandbox
    for made in (net, keyed):  # everything else is the class's
        born = made.birth()[0]
        assert (born.memory_bytes, born.pids_max, born.env) == (128 * MiB, 64, ())
    assert BIRTH_HOST.endswith(".invalid")  # RFC 6761: never resolves


def test_an_unknown_egress_class_is_refused_naming_its_key():
    with pytest.raises(InvalidSpec) as err:
        DaemonConfig(pools={"p": {**CLASS, "egress": "tor"}}).validate()
    assert err.value.field == "pools.p.egress"
    assert str(err.value) == ("pools.p.egress: 'tor': use one of 'none', 'allow_net', "
                              "'secrets'")
