"""Which seccomp profile a remote caller's name reaches, through a real daemon.

Only a built-in (sandbox/profiles/) or an absolute path: a bare name is never looked up in
the daemon's working directory (a policy that lists one does not load), so a NAME.json
planted there is never loaded. An absolute path the operator's policy lists is used.
"""

from __future__ import annotations

import json

import grpc
import pytest

from corral.runtime.client import ClientError

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

#: A profile that confines nothing: what a planted file would give its sandbox.
ALLOW_ALL = {"defaultAction": "SCMP_ACT_ALLOW"}


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """The daemon's working directory, holding evil.json and evil (allow-all profiles)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("evil.json", "evil"):
        (cwd / name).write_text(json.dumps(ALLOW_ALL))
    monkeypatch.chdir(cwd)  # the daemon subprocess starts here
    return cwd


def test_a_bare_name_is_never_a_file_in_the_daemons_directory(make_daemon, planted, tmp_path):
    allowed = tmp_path / "profiles" / "ok.json"
    allowed.parent.mkdir()
    allowed.write_text(json.dumps(ALLOW_ALL))
    # a policy that (wrongly) lists a bare file name is refused when the daemon starts
    wrong = make_daemon("wrong", config="""
[policy]
profiles = ["default", "evil.json"]
""")
    assert wrong.run_to_exit() == 2
    assert ("policy.profiles: 'evil.json' is not a built-in profile (default, unconfined) "
            "or an absolute path") in wrong.log()
    d = make_daemon(config=f"""
[policy]
profiles = ["default", "{allowed}"]
""").start()
    acme = d.client("acme")
    for name in ("evil.json", "evil"):
        with pytest.raises(ClientError) as info:
            acme.create_sandbox(profile=name)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert str(info.value) == (
            f"INVALID_ARGUMENT: spec.profile: no built-in profile named '{name}'; name one of "
            "default, unconfined, or the absolute path of a profile file the operator allows")
    with pytest.raises(ClientError) as info:
        acme.create_sandbox(profile=f"{allowed.parent}/../profiles/ok.json")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert acme.list_sandboxes() == []
    # the absolute path the policy lists is what the sandbox runs under
    sb = acme.create_sandbox(profile=str(allowed))
    try:
        assert sb.spec.profile == str(allowed)
        created = [r for r in d.records("sandbox.create") if r.sandbox_id == sb.id]
        assert [r.detail["profile"] for r in created] == [str(allowed)]
    finally:
        acme.destroy_sandbox(sb.id)
    # a path the policy does not list stays the policy's refusal
    with pytest.raises(ClientError) as info:
        acme.create_sandbox(profile=str(planted / "evil.json"))
    assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
