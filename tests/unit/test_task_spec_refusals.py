"""What a deep task's sandbox cannot have yet is refused at submit, naming the field."""

from __future__ import annotations

import pytest

from corral.runtime.tasks.model import TaskSpec
from corral.sandbox.errors import InvalidSpec
from corral.sandbox.spec import SandboxSpec, SecretBinding


@pytest.mark.parametrize(("sandbox", "field"), [
    (lambda d: SandboxSpec(workspace=d), "spec.sandbox.workspace_dir"),
    (lambda d: SandboxSpec(workspace=d, workspace_cow=True), "spec.sandbox.workspace_dir"),
    (lambda d: SandboxSpec(snapshot="snap-0123456789ab"), "spec.sandbox.snapshot"),
    (lambda d: SandboxSpec(secrets=(SecretBinding("API_KEY", ("api.example.com",)),)),
     "spec.sandbox.secrets"),
])
def test_unsupported_task_sandboxes_are_refused_by_field(tmp_path, sandbox, field):
    with pytest.raises(InvalidSpec) as exc:
        TaskSpec(argv=("true",), sandbox=sandbox(str(tmp_path)))
    assert exc.value.field == field


def test_a_plain_task_sandbox_is_taken():
    assert TaskSpec(argv=("true",), sandbox=SandboxSpec(hostname="job")).sandbox.hostname == "job"
