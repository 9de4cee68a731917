"""The daemon's per-tenant secret store (runtime/secret_store.py): sources, modes, errors."""

from __future__ import annotations

import os

import pytest

from corral.runtime.secret_store import SecretStore, SecretUnavailable, read_secret_file
from corral.sandbox.errors import InvalidSpec, NotFound
from corral.sandbox.spec import SecretBinding

VALUE = b"tok-0123456789abcdef"


def secret_file(path, data: bytes = VALUE + b"\n", mode: int = 0o600) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_a_tenant_directory_file_is_the_value_without_its_newline(tmp_path):
    secret_file(tmp_path / "acme" / "API_TOKEN")
    store = SecretStore.from_config({"dir": str(tmp_path)})
    assert store.values_for("acme", [SecretBinding("API_TOKEN", ("api.test",))]) == {
        "API_TOKEN": VALUE}
    assert store.names("acme") == ["API_TOKEN"]
    assert store.names("other") == []


def test_a_tenant_table_wins_over_the_directory(tmp_path):
    secret_file(tmp_path / "dir" / "acme" / "API_TOKEN", b"from-dir-0000000")
    own = secret_file(tmp_path / "own", b"from-table-00000")
    store = SecretStore.from_config({"dir": str(tmp_path / "dir"),
                                     "tenants": {"acme": {"API_TOKEN": {"file": own}}}})
    assert store.value("acme", "API_TOKEN") == b"from-table-00000"


def test_a_file_is_read_at_each_lookup_so_replacing_it_rotates(tmp_path):
    path = tmp_path / "acme" / "KEY"
    secret_file(path, b"first-value-0000")
    store = SecretStore(str(tmp_path))
    assert store.value("acme", "KEY") == b"first-value-0000"
    secret_file(path, b"second-value-000")
    assert store.value("acme", "KEY") == b"second-value-000"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_file_others_may_read_is_refused_naming_path_and_mode(tmp_path, mode):
    path = secret_file(tmp_path / "acme" / "KEY", mode=mode)
    store = SecretStore(str(tmp_path))
    with pytest.raises(SecretUnavailable, match=(
            rf"^secrets: {path} has mode {mode:04o}; its group or others may read it: "
            rf"chmod 600 {path}$")) as caught:
        store.value("acme", "KEY")
    assert VALUE.decode() not in str(caught.value)


def test_a_symlink_a_fifo_and_a_missing_file_are_refused(tmp_path):
    target = secret_file(tmp_path / "real")
    (tmp_path / "acme").mkdir()
    os.symlink(target, tmp_path / "acme" / "LINK")
    os.mkfifo(tmp_path / "acme" / "PIPE", 0o600)
    store = SecretStore(str(tmp_path))
    with pytest.raises(SecretUnavailable, match=r"a secret file must be a regular file, not "
                                                r"a symlink\)$"):
        store.value("acme", "LINK")
    with pytest.raises(SecretUnavailable, match=r"^secrets: .*/PIPE is not a regular file$"):
        store.value("acme", "PIPE")  # opened O_NONBLOCK: no writer, no wait
    with pytest.raises(NotFound, match=r"^secrets: tenant 'acme' has no secret 'NOPE' in the "
                                       r"daemon's secret store$"):
        store.value("acme", "NOPE")
    with pytest.raises(NotFound):
        read_secret_file(str(tmp_path / "gone"))


def test_a_name_that_is_not_a_variable_never_reaches_the_filesystem(tmp_path):
    secret_file(tmp_path / "secret-outside")
    store = SecretStore(str(tmp_path / "dir"))
    with pytest.raises(NotFound):
        store.value("acme", "../../secret-outside")
    with pytest.raises(NotFound):
        store.value("../x", "KEY")


def test_inline_values_need_a_private_config_file(tmp_path):
    config = tmp_path / "corral.toml"
    config.write_text("")
    section = {"tenants": {"acme": {"KEY": {"value": VALUE.decode()}}}}
    os.chmod(config, 0o644)
    with pytest.raises(InvalidSpec, match=r"^secrets.tenants.acme.KEY: an inline value needs "
                                          r"a config file that only its owner may read"):
        SecretStore.from_config(section, str(config))
    os.chmod(config, 0o600)
    store = SecretStore.from_config(section, str(config))
    assert store.value("acme", "KEY") == VALUE
    assert VALUE.decode() not in repr(store) + repr(store._tenants)


@pytest.mark.parametrize("section, key", [
    ({"dir": "relative"}, "secrets.dir"),
    ({"bogus": 1}, "secrets.bogus"),
    ({"tenants": {"Acme!": {}}}, "secrets.tenants.Acme!"),
    ({"tenants": {"acme": {"1BAD": {"file": "/x"}}}}, "secrets.tenants.acme.1BAD"),
    ({"tenants": {"acme": {"KEY": {"file": "rel"}}}}, "secrets.tenants.acme.KEY"),
    ({"tenants": {"acme": {"KEY": "plain"}}}, "secrets.tenants.acme.KEY"),
])
def test_bad_config_names_the_key(section, key):
    with pytest.raises(InvalidSpec) as caught:
        SecretStore.from_config(section)
    assert caught.value.field == key
