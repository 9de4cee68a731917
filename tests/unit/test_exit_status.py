"""The shell's 128+N convention (sandbox/exit_status.py), as the CLI and the backends use it."""

import signal

import pytest

from corral.runtime.cli import exits
from corral.sandbox.exit_status import killed_by, shell_status, signal_of


def test_killed_by_a_signal_is_128_plus_n():
    assert killed_by(signal.SIGKILL) == 137
    assert killed_by(signal.SIGTERM) == 143


@pytest.mark.parametrize(("returncode", "status"), [(0, 0), (3, 3), (255, 255), (-9, 137)])
def test_shell_status_of_a_returncode(returncode, status):
    assert shell_status(returncode) == status


@pytest.mark.parametrize(("status", "signum"),
                         [(0, None), (1, None), (128, None), (129, 1), (137, 9), (192, 64),
                          (193, None), (255, None)])
def test_signal_of_a_status_reverses_killed_by(status, signum):
    assert signal_of(status) == signum


def test_signal_of_reverses_killed_by_for_every_signal():
    assert all(signal_of(killed_by(n)) == n for n in range(1, 65))


def test_the_cli_re_exports_them():
    assert exits.killed_by is killed_by
    assert exits.shell_status is shell_status
