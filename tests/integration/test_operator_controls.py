"""Protection before any user of a domain is verified (issue 27, item 6): a primary
that answers unknown users with a bare 5xx needs an accepted control on the same
session before the 5xx means "unknown". Debian's Exim accepts postmaster@ before any
lookup (its ``acl_check_rcpt``), so its domains are protected from the first probe; a
primary with bare codes and no postmaster@ is not, unless the operator names a user
known to exist in ``CALLAHEAD_CONTROLS``.

Each case runs ``callahead probe`` (a real process, the configuration ``serve`` reads,
no cache: what ``serve`` knows before it has verified any user of the domain).

The primary without postmaster@ is the scripted server with Exim's own texts
(``tests.harness.scripted.exim_without_postmaster``, with their sources): an Exim whose
postmaster@ accept was taken out of the ACL, or any MTA of the kind.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.fixtures import StartScripted, scripted
from tests.harness.peers import EximPrimary
from tests.harness.scripted import ScriptedServer, exim_without_postmaster

__all__ = ["scripted"]

DOMAIN = "bare.test"
USER = f"it@{DOMAIN}"
EXIM_BARE = exim_without_postmaster([USER])
EXIT = {"valid": 0, "unknown": 1, "tempfail": 2}


def probe(port: int, address: str, controls: str = "") -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CALLAHEAD_ROUTES": f"{address.rpartition('@')[2]}=[127.0.0.1]:{port}",
        "CALLAHEAD_PROBE_TIMEOUT": "10",
        "CALLAHEAD_HELO_NAME": "backup.test",
        "CALLAHEAD_CONTROLS": controls,
    }
    return subprocess.run(
        [sys.executable, "-m", "callahead", "probe", "--explain", address],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def bare(scripted: StartScripted) -> ScriptedServer:
    return scripted(EXIM_BARE)


def test_without_a_control_a_bare_rejection_accepts_the_unknown(bare: ScriptedServer) -> None:
    """The gap: postmaster@ refused like anyone, no user verified yet: undecided."""
    done = probe(bare.port, f"nobody@{DOMAIN}")
    assert done.returncode == EXIT["tempfail"], done.stdout + done.stderr
    assert bare.rcpts() == [f"nobody@{DOMAIN}", f"postmaster@{DOMAIN}"]


def test_an_operators_control_protects_the_domain_from_the_first_probe(
    bare: ScriptedServer,
) -> None:
    done = probe(bare.port, f"nobody@{DOMAIN}", controls=f"{USER}, someone@elsewhere.test")
    assert done.returncode == EXIT["unknown"], done.stdout + done.stderr
    assert f"the control {USER} was accepted on the same session" in done.stdout
    # Asked on the session that got the rejection; postmaster@ never needed.
    [session] = [s for s in bare.sessions if s.rcpts()]
    assert session.rcpts() == [f"nobody@{DOMAIN}", USER]
    # The control itself is a user: valid, never judged by itself.
    assert probe(bare.port, USER, controls=USER).returncode == EXIT["valid"]


def test_an_operators_control_the_primary_refuses_is_drift_not_a_550(
    bare: ScriptedServer,
) -> None:
    """A wrong CALLAHEAD_CONTROLS (the user left) must not turn into refusals: the
    primary refusing a user the operator vouched for reads as drift."""
    done = probe(bare.port, f"nobody@{DOMAIN}", controls=f"gone@{DOMAIN}")
    assert done.returncode == EXIT["tempfail"], done.stdout + done.stderr
    assert "drift" in done.stdout
    # A real user behind it still gets 250: the drift guard never refuses anyone.
    assert probe(bare.port, USER, controls=f"gone@{DOMAIN}").returncode == EXIT["valid"]


def test_a_bad_control_is_a_configuration_error(bare: ScriptedServer) -> None:
    done = probe(bare.port, f"nobody@{DOMAIN}", controls=f"postmaster@{DOMAIN}")
    assert done.returncode == 78, done.stdout + done.stderr
    assert "CALLAHEAD_CONTROLS" in done.stderr
    assert "name a user known to exist" in done.stderr
    assert bare.rcpts() == []


@pytest.fixture
def exim(workdir: Path) -> Iterator[EximPrimary]:
    primary = EximPrimary(workdir, domain="exim.test", users=["u1"])
    primary.start()
    try:
        yield primary
    finally:
        primary.stop()


def test_debians_exim_is_protected_before_any_user_is_verified(exim: EximPrimary) -> None:
    """Its ACL accepts postmaster@ (``250 Accepted``) before any lookup: the control
    of a bare ``550 Unrouteable address``, no CALLAHEAD_CONTROLS needed. (Not nobody@:
    Debian's ``local_user`` router delivers to the system's users.)"""
    done = probe(exim.port, "no-such-user@exim.test")
    assert done.returncode == EXIT["unknown"], done.stdout + done.stderr
    assert "550 Unrouteable address" in done.stdout
    assert "the control postmaster@exim.test was accepted" in done.stdout
    assert probe(exim.port, "u1@exim.test").returncode == EXIT["valid"]
