"""The audit settings of `corral daemon`: flags and TOML keys, with their checks."""

from __future__ import annotations

import pytest

from corral.runtime import cli, config
from corral.sandbox.errors import InvalidSpec


def test_defaults_keep_everything_and_check_the_tail():
    cfg = config.DaemonConfig().validate()
    assert (cfg.verify_audit, cfg.audit_segment_records, cfg.audit_segment_bytes,
            cfg.audit_retention_s) == ("tail", 100_000, 64 << 20, 0.0)


def test_toml_keys(tmp_path):
    path = tmp_path / "corral.toml"
    path.write_text('verify_audit = "full"\naudit_segment_records = 5000\n'
                    'audit_segment_size = "8M"\naudit_retention = "90d"\n')
    cfg = config.load(str(path), {})
    assert (cfg.verify_audit, cfg.audit_segment_records, cfg.audit_segment_bytes,
            cfg.audit_retention_s) == ("full", 5000, 8 << 20, 90 * 86400.0)


def test_flags_win_over_the_file(tmp_path, monkeypatch):
    path = tmp_path / "corral.toml"
    path.write_text('verify_audit = "full"\naudit_retention = "90d"\n')
    seen = {}

    def run(cfg):  # stands in for the daemon: only the merged config matters here
        seen["cfg"] = cfg
        return 0

    monkeypatch.setattr("corral.runtime.daemon.run", run)
    assert cli.main(["daemon", "--config", str(path), "--verify-audit", "tail",
                     "--audit-segment-records", "0", "--audit-segment-size", "0",
                     "--audit-retention", "forever"]) == 0
    cfg = seen["cfg"]
    assert (cfg.verify_audit, cfg.audit_segment_records, cfg.audit_segment_bytes,
            cfg.audit_retention_s) == ("tail", 0, 0, 0.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"verify_audit": "most"}, r"^verify_audit: 'most' is not 'full' or 'tail'$"),
        ({"audit_segment_records": 1},
         r"^audit_segment_records: 1 leaves no room beside the seal; .*$"),
        ({"audit_segment_records": -5}, r"^audit_segment_records: -5 must be a whole .*$"),
        ({"audit_segment_bytes": 100}, r"^audit_segment_bytes: 100 is under 4096 bytes$"),
    ],
)
def test_bad_values_are_refused_by_name(overrides, message):
    with pytest.raises(InvalidSpec, match=message):
        config.load(None, overrides)


def test_a_bad_flag_is_a_usage_error(capsys):
    assert cli.main(["daemon", "--audit-retention", "soon"]) == 2
    assert capsys.readouterr().err == (
        "corral: daemon: audit-retention: 'soon' is not a duration; use e.g. 30s, 5m, 2h or "
        "1m30s\n")
