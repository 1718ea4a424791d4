"""deploy/callahead.service as systemd reads it: ``systemd-analyze verify`` finds nothing
wrong, and ``systemd-analyze security`` rates its exposure no worse than the README says."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.fixtures import make_workdir

from .promql import DEPLOY, REPO
from .tools import run, tool

UNIT = DEPLOY / "callahead.service"
EXPOSURE_LIMIT = 1.5
"""systemd-analyze security's overall exposure of the unit (0 safest, 10 worst) with
the hardening it has now: the figure may only go down. Without the sandboxing block
(PrivateDevices= ... SystemCallFilter=) it was 8.3."""
HARDENING = {
    "User=/DynamicUser=",
    "NoNewPrivileges=",
    "ProtectSystem=",
    "ProtectHome=",
    "PrivateTmp=",
    "RestrictSUIDSGID=",
    "PrivateDevices=",
    "ProtectKernelTunables=",
    "ProtectKernelModules=",
    "ProtectControlGroups=",
    "RestrictNamespaces=~user",
    "LockPersonality=",
    "SystemCallArchitectures=",
    "CapabilityBoundingSet=~CAP_SYS_ADMIN",
}
"""Checks of systemd-analyze security the unit passes today and must keep passing
(each moves the overall figure by a tenth or less, so they are checked one by one)."""


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """The shipped unit with its install paths pointed at this checkout's callahead and
    an environment file, as it would be in /etc/systemd/system."""
    with make_workdir() as workdir:
        callahead = shutil.which("callahead") or str(Path(sys.executable).parent / "callahead")
        env_file = workdir / "callahead.env"
        env_file.write_text((DEPLOY / "callahead.env.example").read_text())
        unit = UNIT.read_text()
        assert "/opt/callahead/bin/callahead" in unit and "/etc/default/callahead" in unit
        unit = unit.replace("/opt/callahead/bin/callahead", callahead)
        unit = unit.replace("/etc/default/callahead", str(env_file))
        (workdir / "callahead.service").write_text(unit)
        yield workdir / "callahead.service"


def test_the_unit_is_notify_with_a_watchdog() -> None:
    unit = UNIT.read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit


def test_the_unit_verifies(installed: Path) -> None:
    done = run([tool("systemd-analyze"), "verify", "--man=no", str(installed)])
    problems = [line for line in (done.stdout + done.stderr).splitlines() if installed.name in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def exposure(unit: Path) -> tuple[float, str]:
    """The overall exposure figure of ``systemd-analyze security --offline=yes`` and its
    whole output."""
    done = run([tool("systemd-analyze"), "security", "--offline=yes", str(unit)])
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    found = re.search(
        rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+) (\w+)", output
    )
    assert found, output
    return float(found.group(1)), output


def test_the_exposure_stays_at_most_the_limit(installed: Path) -> None:
    figure, output = exposure(installed)
    assert 0 < figure <= EXPOSURE_LIMIT, output


def test_the_readme_states_the_exposure(installed: Path) -> None:
    figure, _ = exposure(installed)
    readme = (REPO / "README.md").read_text()
    assert "`systemd-analyze security`" in readme
    assert f"exposure {figure:.1f}" in readme, f"the README should say exposure {figure:.1f}"


def test_the_hardening_checks_pass(installed: Path) -> None:
    done = run(
        [tool("systemd-analyze"), "security", "--offline=yes", "--json=short", str(installed)]
    )
    assert done.returncode == 0, done.stderr
    passed = {check["name"] for check in json.loads(done.stdout) if check["set"]}
    assert passed >= HARDENING, HARDENING - passed


def test_a_worse_unit_scores_worse(installed: Path, tmp_path: Path) -> None:
    """The exposure check can fail: the same unit without DynamicUser= rates worse."""
    worse = tmp_path / installed.name
    worse.write_text(installed.read_text().replace("DynamicUser=yes\n", ""))
    assert exposure(worse)[0] > EXPOSURE_LIMIT


def settings(unit: str, key: str) -> list[str]:
    """The values of every ``key=`` line of ``unit``, split on blanks."""
    return [
        word
        for line in unit.splitlines()
        if line.startswith(f"{key}=")
        for word in line.split("=", 1)[1].split()
    ]


def test_the_unit_starts_before_postfixs_smtpd() -> None:
    # Debian's postfix.service is a oneshot wrapper; smtpd runs under postfix@-.service
    # (tests/system/test_ready.py checks the order systemd derives from it).
    assert {"postfix.service", "postfix@-.service"} <= set(settings(UNIT.read_text(), "Before"))


def test_the_unit_bounds_descriptors_and_tasks() -> None:
    """Issue 26: no LimitNOFILE (1024: about 1000 idle milter connections ran it out),
    no TasksMax of its own."""
    unit = UNIT.read_text()
    assert [int(v) for v in settings(unit, "LimitNOFILE")] == [65536]
    (tasks,) = settings(unit, "TasksMax")
    assert tasks.isdigit() and 500 <= int(tasks) <= 10000, tasks
