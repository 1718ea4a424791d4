"""``callahead doctor`` configures itself as the unit runs: the shell's environment, under
the unit's own ``Environment=`` (the package's drop-in that keeps 0.1's TCP listener),
under ``/etc/default/callahead`` (systemd's EnvironmentFile wins over Environment=).
systemctl is a script here that answers as systemd 252 does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from callahead.process.doctor.checkup import (
    doctor_environment,
    parse_unit_environment,
    unit_environment,
)

DROPIN = "CALLAHEAD_SOCKET=inet:127.0.0.1:8895"


def fake_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    """A ``systemctl`` first on PATH running ``script``; its arguments go to a file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv = tmp_path / "argv"
    systemctl = bin_dir / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" > {argv}\n{script}\n')
    systemctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return argv


def test_the_unit_s_environment_is_read_with_systemctl_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = fake_systemctl(tmp_path, monkeypatch, f"echo '{DROPIN} LANG=C.UTF-8'")
    assert unit_environment(running=str(tmp_path)) == {
        "CALLAHEAD_SOCKET": "inet:127.0.0.1:8895",
        "LANG": "C.UTF-8",
    }
    assert argv.read_text().split() == [
        "show",
        "-p",
        "Environment",
        "--value",
        "callahead.service",
    ]


def test_a_value_systemctl_cannot_print_is_left_out_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """systemctl show prints ``[unprintable]`` for a value with a space."""
    assert parse_unit_environment(f"{DROPIN} [unprintable]\n") == (
        {"CALLAHEAD_SOCKET": "inet:127.0.0.1:8895"},
        1,
    )
    fake_systemctl(tmp_path, monkeypatch, f"echo '[unprintable] {DROPIN}'")
    assert unit_environment(running=str(tmp_path)) == {"CALLAHEAD_SOCKET": "inet:127.0.0.1:8895"}
    err = capsys.readouterr().err
    assert "Environment= has 1 value(s) with a space that systemctl show cannot print" in err


@pytest.mark.parametrize(
    "script",
    ["echo 'Failed to connect to bus: No such file or directory' >&2; exit 1", "exec sleep 30"],
    ids=["fails", "hangs"],
)
def test_a_systemctl_that_fails_gives_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str
) -> None:
    fake_systemctl(tmp_path, monkeypatch, script)
    monkeypatch.setattr("callahead.process.doctor.checkup.SYSTEMCTL_TIMEOUT", 0.5)
    assert unit_environment(running=str(tmp_path)) == {}


def test_without_systemd_or_systemctl_nothing_is_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = fake_systemctl(tmp_path, monkeypatch, f"echo '{DROPIN}'")
    assert unit_environment(running=str(tmp_path / "not-booted")) == {}
    assert not argv.exists()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert unit_environment(running=str(tmp_path)) == {}


def test_the_env_file_wins_over_the_unit_which_wins_over_the_shell(tmp_path: Path) -> None:
    env_file = tmp_path / "callahead"
    env_file.write_text("CALLAHEAD_HELO_NAME=mx.example.com\n")
    unit = {"CALLAHEAD_SOCKET": "inet:127.0.0.1:8895", "CALLAHEAD_HELO_NAME": "unit.example"}
    shell = {"CALLAHEAD_SOCKET": "unix:/x.sock", "CALLAHEAD_LOG_LEVEL": "DEBUG"}
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as patch:
        patch.setattr("callahead.process.doctor.checkup.ENV_FILE", str(env_file))
        merged = doctor_environment(shell, None, lambda: unit)
    assert merged == {
        "CALLAHEAD_SOCKET": "inet:127.0.0.1:8895",
        "CALLAHEAD_HELO_NAME": "mx.example.com",
        "CALLAHEAD_LOG_LEVEL": "DEBUG",
    }


def test_an_env_file_named_on_the_command_line_is_read_without_the_unit(tmp_path: Path) -> None:
    """``--env-file FILE`` (or ``--env-file=``, none) says which configuration to check."""
    env_file = tmp_path / "other"
    env_file.write_text("CALLAHEAD_HELO_NAME=mx.example.com\n")

    def unit() -> dict[str, str]:
        raise AssertionError("the unit is not asked")

    assert doctor_environment({}, str(env_file), unit) == {"CALLAHEAD_HELO_NAME": "mx.example.com"}
    assert doctor_environment({"A": "1"}, "", unit) == {"A": "1"}
