"""What a deep task's sandbox cannot have is refused at submit, naming the field; what it can
have (copy-on-write workspaces, snapshots, secrets) is taken."""

from __future__ import annotations

import pytest

from corral.runtime.tasks.model import TaskSpec
from corral.sandbox.errors import InvalidSpec
from corral.sandbox.spec import SandboxSpec, SecretBinding


def test_a_host_directory_shown_as_is_is_refused_by_field(tmp_path):
    """An attempt may be retried: a host directory written in place would see each attempt's
    half-done changes, so only a copy-on-write view of it is taken."""
    with pytest.raises(InvalidSpec) as exc:
        TaskSpec(argv=("true",), sandbox=SandboxSpec(workspace=str(tmp_path)))
    assert exc.value.field == "spec.sandbox.workspace_dir"


@pytest.mark.parametrize("sandbox", [
    lambda d: SandboxSpec(workspace=d, workspace_cow=True),
    lambda d: SandboxSpec(snapshot="snap-0123456789ab"),
    lambda d: SandboxSpec(secrets=(SecretBinding("API_KEY", ("api.example.com",)),)),
], ids=["cow-workspace", "snapshot", "secrets"])
def test_sandbox_state_and_secrets_are_taken(tmp_path, sandbox):
    spec = sandbox(str(tmp_path))
    assert TaskSpec(argv=("true",), sandbox=spec).sandbox == spec


def test_a_plain_task_sandbox_is_taken():
    assert TaskSpec(argv=("true",), sandbox=SandboxSpec(hostname="job")).sandbox.hostname == "job"
