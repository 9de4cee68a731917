"""The agent protocol has one home, corral.ext.agent: no second copy of its numbers or names.

The runtime imports the fd numbers, environment names, frame kinds and limits from
ext/agent.py, the same file every sandbox gets as corral_agent.py. The token core parses the
same frames without importing anything of Corral, so its FrameType and EventKind are a
mirror, held equal here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from corral.ext import agent as protocol

from .test_stream_core import IMPLS, load_impl

PACKAGE = Path(protocol.__file__).resolve().parent.parent
PROTOCOL_FILE = Path(protocol.__file__).resolve()
#: The token core's pure-Python twin: FrameType is its mirror of the frame kinds (below).
CORE_TWIN = PACKAGE / "ext" / "_stream_py.py"

AGENT_TO_RUNTIME = ("TOKEN", "TURN_END", "PROGRESS", "CHECKPOINT", "RESULT", "LOG", "TOOL_CALL")
RUNTIME_TO_AGENT = ("INPUT", "INTERRUPT", "SHUTDOWN")
FRAME_KINDS = AGENT_TO_RUNTIME + RUNTIME_TO_AGENT
ENV_NAMES = {protocol.PROTOCOL_ENV, protocol.EVENTS_FD_ENV, protocol.CONTROL_FD_ENV}


def production_files() -> list[Path]:
    files = [p for d in ("runtime", "sandbox", "ext") for p in (PACKAGE / d).rglob("*.py")]
    return sorted(p for p in files if p not in {PROTOCOL_FILE, CORE_TWIN})


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}


def _names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, ast.Tuple):
        return [n for elt in target.elts for n in _names(elt)]
    return []


def protocol_copies(path: Path) -> list[str]:
    """Where a file spells a protocol constant itself instead of importing it."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and node.value in ENV_NAMES
                and id(node) not in docstrings):
            found.append(f"{path.name}:{node.lineno}: the string {node.value!r}")
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            literal = isinstance(node.value, ast.Constant | ast.Tuple)
            for name in (n for t in targets for n in _names(t)):
                bare = name.lstrip("_")
                pipe_fd = bare.endswith("_FD") and ("EVENTS" in bare or "CONTROL" in bare)
                if literal and (pipe_fd or bare in FRAME_KINDS):
                    found.append(f"{path.name}:{node.lineno}: {name} = a literal")
    return found


def test_no_production_module_keeps_its_own_copy_of_the_protocol():
    copies = [c for path in production_files() for c in protocol_copies(path)]
    assert copies == []


def test_the_copy_check_finds_a_copy(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""CORRAL_EVENTS_FD in a docstring is fine."""\n'
                       'EVENTS_FD = 3\n_PROGRESS, _LOG = 3, 6\nenv = {"CORRAL_CONTROL_FD": "4"}\n'
                       'INIT_STATUS_FD = 3  # another pipe: not the protocol\n')
    assert protocol_copies(planted) == [
        "planted.py:2: EVENTS_FD = a literal",
        "planted.py:3: _PROGRESS = a literal",
        "planted.py:3: _LOG = a literal",
        "planted.py:4: the string 'CORRAL_CONTROL_FD'",
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_the_token_core_mirrors_the_frame_kinds(impl):
    core = load_impl(impl)
    assert {t.name: int(t) for t in core.FrameType} == {
        name: getattr(protocol, name) for name in FRAME_KINDS}
    for name in AGENT_TO_RUNTIME:  # a log entry's kind is the type byte of its frame
        assert int(core.EventKind[name]) == getattr(protocol, name)
    assert core.HEADER_SIZE == protocol.HEADER.size
    assert core.DEFAULT_MAX_FRAME_BYTES == protocol.MAX_CONTROL_PAYLOAD
    for kind in FRAME_KINDS:
        payload = b"x" * (getattr(protocol, kind) * 3)
        assert protocol.encode_frame(getattr(protocol, kind), payload) == core.encode_frame(
            getattr(protocol, kind), payload)


def test_the_protocol_module_imports_only_the_standard_library():
    tree = ast.parse(PROTOCOL_FILE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert imported - {"__future__"} <= sys.stdlib_module_names
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))


def test_the_runtime_puts_the_pipes_where_the_protocol_says():
    from corral.runtime.streams import AgentPipes

    assert AgentPipes.env() == {"CORRAL_PROTOCOL": "1", "CORRAL_EVENTS_FD": "3",
                                "CORRAL_CONTROL_FD": "4"}
    assert (protocol.EVENTS_FD, protocol.CONTROL_FD) == (3, 4)
