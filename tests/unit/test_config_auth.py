"""Daemon configuration (flags + TOML, same names) and caller identification."""

import pytest

from corral.runtime.auth import Authenticator
from corral.runtime.config import DaemonConfig, load
from corral.sandbox.errors import InvalidSpec, Unauthenticated

TOKEN = "t0ken-of-acme-0123456789"


def write(tmp_path, text):
    path = tmp_path / "corral.toml"
    path.write_text(text)
    return str(path)


def test_toml_uses_the_flag_names_and_flags_win(tmp_path):
    path = write(tmp_path, f"""
socket = "/tmp/x.sock"
listen = "127.0.0.1:7070"
session_idle_ttl = "90s"
sandbox_ttl = "2h"
max_sandboxes = 8
operators = ["root-team"]

[tenants.acme]
token = "{TOKEN}"
""")
    cfg = load(path, {"socket": "/tmp/flag.sock", "max_sandboxes": None})
    assert cfg.socket == "/tmp/flag.sock"
    assert cfg.listen == "127.0.0.1:7070"
    assert cfg.session_idle_ttl_s == 90
    assert cfg.sandbox_ttl_s == 7200
    assert cfg.max_sandboxes == 8
    assert cfg.tokens == {TOKEN: "acme"}
    assert cfg.operators == ("root-team",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus = 1", r"^config: .*: unknown setting 'bogus'$"),
        ("[tenants.acme]\nname = 'x'", r"^tenants\.acme\.name: unknown policy setting \(known: "),
        ("[tenants.acme]\ntoken = 7", r"^config: .*: tenants\.acme\.token must be a string$"),
        ("[policy]\nmax_memory = 'lots'", r"^policy\.max_memory: 'lots' is not a size"),
        ("[policy]\nallow_net = ['*']", r"^policy\.allow_net: '\*': not a host name"),
        ("[policy]\nmax_sandboxes = -1", r"^policy\.max_sandboxes: -1 must be a whole number"),
        ("[policy]\nprofiles = ['gpu.json']", r"^policy\.profiles: 'gpu\.json' is not a "
                                               r"built-in profile \(default, unconfined\) or "
                                               r"an absolute path$"),
        ("[tenants.'Bad Name']\ntoken = 'x'", r"^tenant: 'Bad Name' is not a tenant name"),
        ("session_idle_ttl = 'soon'", r"^session_idle_ttl: 'soon' is not a duration"),
        ("listen = '127.0.0.1:99'", r"^listen: a TCP listener needs at least one tenant token$"),
        ("socket = ", r"^config: .*corral\.toml: "),
    ],
)
def test_bad_config_names_the_field(tmp_path, text, message):
    with pytest.raises(InvalidSpec, match=message):
        load(write(tmp_path, text), {})


def test_missing_config_file():
    with pytest.raises(InvalidSpec, match=r"^config: '/nonexistent.toml' does not exist$"):
        load("/nonexistent.toml", {})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"listen": "localhost"}, r"^listen: 'localhost' is not HOST:PORT$"),
        ({"listen": "h:70000", "tokens": {TOKEN: "a"}}, r"^listen: 'h:70000' is not HOST:PORT$"),
        ({"tokens": {"short": "a"}}, r"^tokens: the token of tenant 'a' is shorter than 16$"),
        ({"tls_cert": "/x.pem"}, r"^tls_cert: tls_cert and tls_key go together$"),
        ({"max_sandboxes": 0}, r"^max_sandboxes: must be at least 1$"),
        ({"mux_interval_ms": -1}, r"^mux_interval_ms: -1 must be between 0 and 1000 ms$"),
        ({"mux_interval_ms": "2"}, r"^mux_interval_ms: '2' must be between 0 and 1000 ms$"),
    ],
)
def test_validate(kwargs, message):
    with pytest.raises(InvalidSpec, match=message):
        DaemonConfig(**kwargs).validate()


class FakeContext:
    def __init__(self, peer, metadata=()):
        self._peer = peer
        self._metadata = metadata

    def peer(self):
        return self._peer

    def invocation_metadata(self):
        return self._metadata


def test_unix_callers_pick_a_tenant_default_local_operator():
    auth = Authenticator({TOKEN: "acme"})
    local = auth.identify(FakeContext("unix:/run/corral/corral.sock"))
    assert (local.tenant, local.operator) == ("local", True)
    acme = auth.identify(FakeContext("unix:", (("x-corral-tenant", "acme"),)))
    assert (acme.tenant, acme.operator) == ("acme", False)
    with pytest.raises(Unauthenticated, match=r"^x-corral-tenant: 'ACME!' is not a tenant"):
        auth.identify(FakeContext("unix:", (("x-corral-tenant", "ACME!"),)))


def test_tcp_callers_need_a_known_bearer_token():
    auth = Authenticator({TOKEN: "acme"})
    caller = auth.identify(FakeContext("ipv4:127.0.0.1:5555",
                                       (("authorization", f"Bearer {TOKEN}"),)))
    assert (caller.tenant, caller.peer, caller.operator) == ("acme", "ipv4:127.0.0.1:5555", False)
    # a tenant header does not let a TCP caller become someone else
    caller = auth.identify(FakeContext("ipv4:1.2.3.4:1", (("authorization", f"Bearer {TOKEN}"),
                                                          ("x-corral-tenant", "local"))))
    assert caller.tenant == "acme"
    with pytest.raises(Unauthenticated, match=r"^this listener needs 'authorization: Bearer"):
        auth.identify(FakeContext("ipv4:127.0.0.1:1"))
    with pytest.raises(Unauthenticated, match=r"^unknown bearer token$"):
        auth.identify(FakeContext("ipv4:127.0.0.1:1", (("authorization", "Bearer nope"),)))
