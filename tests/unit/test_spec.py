"""SandboxSpec validation and the unit parsers: every bad input names its field."""

import pytest

from corral.sandbox import InvalidSpec, SandboxSpec, parse_duration, parse_size
from corral.sandbox.spec import BindMount, GiB, KiB, MiB


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * MiB),
        ("2G", 2 * GiB),
        ("64KiB", 64 * KiB),
        ("64kb", 64 * KiB),
        ("1.5G", int(1.5 * GiB)),
        ("4096", 4096),
        ("100b", 100),
        (" 8m ", 8 * MiB),
        (123, 123),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text, "memory") == expected


@pytest.mark.parametrize("text", ["12Q", "", "M", "-5M", "1.2.3G", "5 GiBs", "0.1"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidSpec, match=r"^memory: .*(not a size|at least 1 byte)"):
        parse_size(text, "memory")


def test_parse_size_message_is_actionable():
    with pytest.raises(InvalidSpec, match=r"^memory: '12Q' is not a size; use e.g. 512M or 2G$"):
        parse_size("12Q", "memory")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("2h", 7200), ("1m30s", 90), ("500ms", 0.5), ("1d", 86400),
     ("2.5", 2.5), (7, 7)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text, "timeout") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "10x", "s", "1m 30s", "", "-3s", "0s"])
def test_parse_duration_rejects(text):
    with pytest.raises(InvalidSpec, match=r"^timeout: "):
        parse_duration(text, "timeout")


def test_defaults_are_the_documented_policy():
    spec = SandboxSpec()
    assert spec.profile == "default"
    assert spec.memory_bytes == 512 * MiB
    assert spec.pids_max == 256
    assert spec.cpus == 1.0
    assert spec.timeout_s is None
    assert spec.tmp_bytes == 64 * MiB
    assert spec.uid_base is None  # a range of its own is taken at start (sandbox/ids.py)
    assert spec.hostname == "corral"


def test_spec_is_frozen():
    spec = SandboxSpec()
    with pytest.raises(AttributeError):
        spec.memory_bytes = 1  # type: ignore[misc]


def test_build_from_flags(tmp_path):
    spec = SandboxSpec.build(
        memory="256M", pids="64", cpus="0.5", timeout="1m", workspace=str(tmp_path),
        ro=["/usr/share:/share"], rw=[str(tmp_path)], env=["A=1", "B=x=y"], tmp_size="8M",
    )
    assert spec.memory_bytes == 256 * MiB
    assert spec.pids_max == 64
    assert spec.cpus == 0.5
    assert spec.timeout_s == 60
    assert spec.workspace == str(tmp_path)
    assert spec.binds == (
        BindMount("/usr/share", "/share", False),
        BindMount(str(tmp_path), str(tmp_path), True),
    )
    assert spec.env == (("A", "1"), ("B", "x=y"))
    assert "A=1" in spec.environment() and "HOME=/workspace" in spec.environment()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pids": "many"}, r"^pids: 'many' is not a whole number$"),
        ({"cpus": "half"}, r"^cpus: 'half' is not a number of cores, e\.g\. 0\.5$"),
        ({"cpus": "0"}, r"^cpus: 0\.0 must be between 0\.01 and 4096 cores$"),
        ({"workspace": "/nonexistent/ws"},
         r"^workspace: '/nonexistent/ws' is not an existing directory$"),
        ({"ro": ["/nonexistent/x"]}, r"^ro: '/nonexistent/x' does not exist on the host$"),
        ({"ro": ["/usr:relative"]}, r"^ro: 'relative' must be an absolute path without '\.\.'$"),
        ({"rw": ["/usr:/proc/x"]}, r"^rw: '/proc/x' is managed by Corral itself$"),
        ({"ro": ["/usr:/a", "/bin:/a"]}, r"^ro: '/a' is mounted twice$"),
        ({"env": ["NOEQUALS"]}, r"^env: 'NOEQUALS' is not KEY=VALUE$"),
        ({"env": ["1BAD=x"]}, r"^env: '1BAD' is not a valid variable name$"),
        ({"memory": "4M"}, r"^memory_bytes: 4194304 is below the 8M minimum$"),
        ({"pids": 1}, r"^pids_max: 1 is below 2 \(init \+ one command\)$"),
        ({"hostname": "Bad_Host"}, r"^hostname: 'Bad_Host' is not a valid host name$"),
        ({"profile": ""}, r"^profile: must name a profile or a JSON file$"),
    ],
)
def test_build_rejects_with_field_named(kwargs, message):
    with pytest.raises(InvalidSpec, match=message):
        SandboxSpec.build(**kwargs)


def test_uid_base_zero_would_map_root_to_root():
    with pytest.raises(InvalidSpec, match=r"^uid_base: root inside must map to an unprivileged"):
        SandboxSpec(uid_base=0)


@pytest.mark.parametrize("field", ["memory_bytes", "tmp_bytes", "fsize_bytes", "pids_max",
                                   "nofile"])
def test_quantities_past_2_62_are_refused_naming_the_field(field):
    from corral.sandbox.errors import InvalidSpec
    from corral.sandbox.spec import MAX_QUANTITY, SandboxSpec

    with pytest.raises(InvalidSpec) as info:
        SandboxSpec(**{field: MAX_QUANTITY + 1})
    assert info.value.field == field
    assert "over the limit" in str(info.value)
