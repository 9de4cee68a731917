"""Every INVALID_ARGUMENT the daemon can send reads `field.path: problem` (issue #17).

Three nets, so a new validator cannot drift: (1) the validators a request passes through
(the spec conversion of the API, labels, paging, tasks, resume points, undecodable bytes)
are fed bad input and each message is checked; (2) every `InvalidSpec(...)` written in
runtime/ and sandbox/ with a literal field is read from the source and its field checked;
(3) every error class mapped to INVALID_ARGUMENT is an InvalidSpec (which builds the shape),
bar the ones listed with the change that fixes them.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

from corral.runtime.api import bounds, wire
from corral.runtime.api.sandboxes import spec_from_proto
from corral.runtime.labels import check_labels, check_page_size, page_token, parse_page_token
from corral.runtime.streams import SeqOutOfRange
from corral.runtime.tasks import model
from corral.sandbox import errors
from corral.sandbox.errors import InvalidSpec
from corral.sandbox.spec import SandboxSpec, check_argv, check_env, parse_duration, parse_size
from corral.v1 import sandbox_pb2

ROOT = Path(__file__).resolve().parents[2]
#: A field path (`spec.memory_bytes`, `labels.team`, `archive.entries[3]`, `--sandbox` for
#: a CLI flag), a colon, a space, then the problem.
SHAPE = re.compile(r"^-{0,2}[A-Za-z_][\w-]*(\.[\w/-]+|\[[^\]]*\])*: \S")
FIELD = re.compile(r"^-{0,2}[A-Za-z_][\w-]*(\.[\w/-]+|\[[^\]]*\])*$")

#: INVALID_ARGUMENT classes not yet shaped, each with the change that shapes it (a test
#: elsewhere still reads the old words; the lead folds the change in with it).
NOT_YET_SHAPED: set[str] = set()


def _refusal(fn, *args, **kw) -> str:
    with pytest.raises(InvalidSpec) as caught:
        fn(*args, **kw)
    return str(caught.value)


BAD_SPECS = {
    "memory": sandbox_pb2.SandboxSpec(memory_bytes=1),
    "pids": sandbox_pb2.SandboxSpec(pids_max=1 << 30),
    "cpus": sandbox_pb2.SandboxSpec(cpus=1000.0 * 1000),
    "command timeout": sandbox_pb2.SandboxSpec(command_timeout_s=-1),
    "tmp": sandbox_pb2.SandboxSpec(tmp_bytes=1),
    "hostname": sandbox_pb2.SandboxSpec(hostname="not a host"),
    "env": sandbox_pb2.SandboxSpec(env={"A=B": "x"}),
    "allow_net": sandbox_pb2.SandboxSpec(allow_net=["exa mple"]),
    "backend": sandbox_pb2.SandboxSpec(backend="vm"),
    "workspace": sandbox_pb2.SandboxSpec(workspace_dir="relative"),
    "cow without workspace": sandbox_pb2.SandboxSpec(workspace_cow=True),
    "secret": sandbox_pb2.SandboxSpec(secrets=[sandbox_pb2.SecretBinding(name="x y")]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_a_bad_sandbox_spec_names_its_field(case):
    assert SHAPE.match(_refusal(spec_from_proto, BAD_SPECS[case]))


@pytest.mark.parametrize("call", [
    lambda: parse_size("12Q", "memory"),
    lambda: parse_duration("soon", "ttl"),
    lambda: check_argv([], "argv"),
    lambda: check_argv(["a\0b"], "argv"),
    lambda: check_env([("", "v")]),
    lambda: SandboxSpec(snapshot="snap-nothex"),
    lambda: SandboxSpec(profile=""),
    lambda: check_labels({"team": "no spaces allowed"}),
    lambda: check_labels({f"k{i}": "v" for i in range(1000)}),
    lambda: check_page_size(1 << 30),
    lambda: parse_page_token("garbage!", "sandboxes", ""),
    lambda: parse_page_token(page_token("sandboxes", "a=b", 3), "sandboxes", "c=d"),
    lambda: model.check_request_id("has space"),
    lambda: model.check_label_key("", "spec.labels"),
    lambda: model.check_resource("cpu", -1.0, "spec.resources"),
    lambda: model.parse_pairs(["novalue"], "selector"),
])
def test_the_request_validators_shape_their_refusals(call):
    assert SHAPE.match(_refusal(call))


def test_a_missing_command_names_argv0():
    missing = errors.CommandNotFound("/no such", 2)
    assert isinstance(missing, InvalidSpec)  # the CLI catches it first for exit 127
    assert str(missing) == ("argv[0]: '/no such' cannot be executed inside the sandbox: "
                            "No such file or directory")
    assert SHAPE.match(str(missing))


def test_a_resume_point_past_the_end_names_the_field():
    message = str(SeqOutOfRange("resume.after_seq", 10**9, 5))
    assert message.startswith("resume.after_seq: 1000000000 is past the newest entry")


def test_undecodable_bytes_name_the_request():
    deserialize = wire._request_deserializer(sandbox_pb2.CreateSandboxRequest)
    refused = deserialize(b"\xff\xff\xff")
    assert isinstance(refused, wire.Refused)
    assert SHAPE.match(refused.message)
    assert refused.message.startswith("request: the 3 bytes received are not")


def test_a_cut_message_keeps_its_field():
    long = str(InvalidSpec("spec.hostname", repr("x" * 5000) + " is not a valid host name"))
    cut = bounds.bounded_message(long)
    assert len(cut) < len(long)
    assert cut.startswith("spec.hostname: 'xxx")
    assert cut.endswith("is not a valid host name")


def _literal_fields() -> list[tuple[str, int, str]]:
    """(file, line, field) of each InvalidSpec(...) call whose field is written literally
    (an f-string's placeholders read as X)."""
    found = []
    for top in ("runtime", "sandbox"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if path.name.endswith("_pb2.py"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not (isinstance(node, ast.Call) and node.args
                        and getattr(node.func, "id", getattr(node.func, "attr", "")) ==
                        "InvalidSpec"):
                    continue
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    text = first.value
                elif isinstance(first, ast.JoinedStr):
                    text = "".join(v.value if isinstance(v, ast.Constant) else "X"
                                   for v in first.values)
                else:
                    continue
                found.append((str(path.relative_to(ROOT)), node.lineno, text))
    return found


#: Literal "fields" that are no request field: a host file the daemon reads (its own
#: configuration, never a client's request).
HOST_FILES = {"docker config"}


def test_every_literal_field_in_the_source_is_a_field_path():
    fields = _literal_fields()
    assert len(fields) > 100  # the walk saw the validators
    wrong = [f for f in fields if f[2] not in HOST_FILES and not FIELD.match(f[2])]
    assert wrong == []


def _error_classes() -> set[type]:
    """Every CorralError subclass defined under runtime/ and sandbox/ (modules imported)."""
    import corral.runtime
    import corral.sandbox

    for package in (corral.runtime, corral.sandbox):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("_pb2") or ".cli." in info.name:
                continue
            try:
                importlib.import_module(info.name)
            except ImportError:
                continue  # an optional extra (e.g. the docker client) not installed
    seen, todo = set(), [errors.CorralError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    return seen


def test_every_invalid_argument_error_is_shaped_by_invalid_spec():
    unshaped = {cls.__name__ for cls in _error_classes()
                if cls.grpc_status == "INVALID_ARGUMENT" and not issubclass(cls, InvalidSpec)}
    assert unshaped == NOT_YET_SHAPED
