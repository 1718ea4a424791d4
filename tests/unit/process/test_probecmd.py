"""``callahead probe`` and ``config`` with ``--env-file`` (the unit's file read whole, a
route list with spaces kept), and ``probe --explain`` naming the MX targets it never
probed (routing/targets.py), against scripted primaries and a scripted DNS."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from callahead.process import probecmd
from callahead.process.cli import main
from callahead.process.config import EX_CONFIG, Config
from callahead.routing.resolve import MxResolver
from tests.harness.fixtures import StartScripted
from tests.harness.scripted import Script
from tests.unit.routing.test_resolve import SELF, FakeDns

HELO = "backup.example.net"
OK = "250 2.1.5 Ok"
UNKNOWN = "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"


def env_file(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "callahead"
    path.write_text("\n".join(["# /etc/default/callahead", "", *lines]) + "\n")
    return str(path)


def test_config_env_file_keeps_a_route_list_with_spaces_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``env $(grep ... | xargs)`` split this value at its space and lost the second
    route; the file read as systemd reads it keeps both."""
    routes = "a.test=[192.0.2.1]:25 b.test=[192.0.2.2]:2525"
    path = env_file(tmp_path, f"CALLAHEAD_ROUTES={routes}", 'CALLAHEAD_PROBE_TIMEOUT="3"')
    assert main(["config", "--env-file", path], env={"CALLAHEAD_HELO_NAME": HELO}) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"CALLAHEAD_ROUTES={routes}" in out
    assert "CALLAHEAD_PROBE_TIMEOUT=3" in out
    assert f"CALLAHEAD_HELO_NAME={HELO}" in out  # the environment still counts
    # The file wins over the environment, as for the unit.
    assert main(["config", "--env-file", path], env={"CALLAHEAD_ROUTES": "c.test=[x]"}) == 0
    assert f"CALLAHEAD_ROUTES={routes}" in capsys.readouterr().out


def test_probe_env_file_reaches_the_route_after_the_space(
    tmp_path: Path, scripted: StartScripted, capsys: pytest.CaptureFixture[str]
) -> None:
    primary = scripted(Script(rcpt_default=UNKNOWN))
    path = env_file(
        tmp_path,
        f"CALLAHEAD_ROUTES=a.test=[192.0.2.1]:25 example.test=[127.0.0.1]:{primary.port}",
        f"CALLAHEAD_HELO_NAME={HELO}",
        "CALLAHEAD_PROBE_TIMEOUT=3",
    )
    assert main(["probe", "--env-file", path, "nobody@example.test"], env={}) == 1
    assert primary.rcpts() == ["nobody@example.test"]
    assert capsys.readouterr().out.startswith("unknown: nobody@example.test")


def test_an_env_file_that_cannot_be_read_is_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing")
    assert main(["config", "--env-file", missing], env={}) == EX_CONFIG
    assert main(["probe", "--env-file", missing, "u@example.test"], env={}) == EX_CONFIG
    assert f"cannot read {missing}" in capsys.readouterr().err


def resolver_of(monkeypatch: pytest.MonkeyPatch, dns: FakeDns) -> None:
    """``probe`` resolves through ``dns``; 127.0.0.1 (the scripted primaries) is let
    in as CALLAHEAD_MX_ALLOW_NETWORKS would, every other loopback address is not."""

    def build(config: Config) -> tuple[MxResolver, None]:
        allowed = (ipaddress.ip_network("127.0.0.1/32"),)
        return MxResolver(dns, SELF, shuffle=False, allowed=allowed), None

    monkeypatch.setattr(probecmd, "build_resolver", build)


def test_explain_names_the_mx_targets_never_probed(
    monkeypatch: pytest.MonkeyPatch, scripted: StartScripted, capsys: pytest.CaptureFixture[str]
) -> None:
    primary = scripted(Script(rcpt_default=OK))
    resolver_of(
        monkeypatch,
        FakeDns(
            {"example.test": [(10, "mx1.example.test"), (20, "backup.example.net")]},
            {"mx1.example.test": ["0.0.0.0", "127.0.0.1"], "backup.example.net": ["192.0.2.9"]},
        ),
    )
    env = {
        "CALLAHEAD_ROUTES": f"example.test=example.test:{primary.port}",
        "CALLAHEAD_HELO_NAME": HELO,
        "CALLAHEAD_PROBE_TIMEOUT": "3",
    }
    assert main(["probe", "--explain", "user@example.test"], env=env) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:4] == [
        "MX targets never probed:",
        "  mx1.example.test 0.0.0.0 (unspecified)",
        "  backup.example.net 192.0.2.9 (this host)",
    ]
    assert "transcript:" in lines
    assert primary.rcpts() == ["user@example.test"]


def test_explain_with_every_target_skipped_is_undecided_and_says_why(
    monkeypatch: pytest.MonkeyPatch, scripted: StartScripted, capsys: pytest.CaptureFixture[str]
) -> None:
    decoy = scripted(Script(rcpt_default=UNKNOWN))
    resolver_of(
        monkeypatch,
        FakeDns({"example.test": [(10, "mx.example.test")]}, {"mx.example.test": ["127.0.0.2"]}),
    )
    env = {
        "CALLAHEAD_ROUTES": f"example.test=example.test:{decoy.port}",
        "CALLAHEAD_HELO_NAME": HELO,
        "CALLAHEAD_PROBE_TIMEOUT": "3",
    }
    assert main(["probe", "--explain", "nobody@example.test"], env=env) == 2
    out = capsys.readouterr().out
    assert out.startswith("tempfail: nobody@example.test")
    assert "every address left is skipped: mx.example.test 127.0.0.2 (loopback)" in out
    assert "MX targets never probed:\n  mx.example.test 127.0.0.2 (loopback)\n" in out
    assert "  (nothing was said)" in out
    assert decoy.connections == 0
