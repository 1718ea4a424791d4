"""The package's life as an operator lives it (issue 26, item 2): a first install, an
upgrade while mail flows, ``apt remove`` and ``apt purge``, in a booted container of
their own (conftest's ``prepared``; Postfix on 127.0.70.3, beside ``system``'s), in this
order.

The upgrade is the one operators make: from release 0.1.0 (built from git,
``debpkg.PREVIOUS_RELEASE``), configured as 0.1.0's README had it (no CALLAHEAD_SOCKET,
so its milter on inet:127.0.0.1:8895, and that in main.cf), to this tree's package.

Before the fix the package's preinst stopped callahead on upgrade and nothing started it
again: every recipient was accepted unverified (``milter_default_action = accept``)
until someone noticed; and ``apt remove`` left it running. Now the postinst restarts it
(``dh_installsystemd --restart-after-upgrade``): unknown recipients are refused again
once the restart is over, and only a recipient whose session fell in that window was
accepted unverified. And 0.2.0's default listener is a unix socket: the postinst keeps
0.1's TCP one (a drop-in) where the operator never set CALLAHEAD_SOCKET, or main.cf
would name a port nobody listens on and every recipient would pass unverified."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import debpkg
from tests.harness.client import send
from tests.harness.ports import listening
from tests.harness.waiting import wait_for

from .conftest import BACKUP_HOST, DOMAIN, KNOWN, System, apt_install, callahead_env, prepared

HOST = "127.0.70.3"
SENDER = "sender@remote.test"
STATE = ("/var/lib/private/callahead", "/var/lib/callahead")
SOCKET_DIR = "/var/spool/postfix/callahead"
OLD_MILTER_HOST, OLD_MILTER_PORT = "127.0.0.1", 8895
"""0.1.0's default milter listener (CALLAHEAD_SOCKET unset)."""
DROPIN = "/etc/systemd/system/callahead.service.d/0.1-tcp-listener.conf"
RESTART_BOUND = 20.0
"""Seconds the restart may take at most: TimeoutStopSec (15) and a start (about 1 s)."""
SLACK = 1.0
"""Seconds around the restart window for an SMTP session that straddles its edges."""


@dataclass
class Box:
    system: System
    old: Path
    new: Path
    first_install: tuple[str, str] = ("", "")
    """``systemctl is-enabled`` and ``is-active`` right after the first install."""
    upgrade_output: str = ""
    """What ``apt-get install`` of the new package printed."""


@dataclass
class Attempt:
    """One unknown recipient sent through the container's Postfix."""

    began: float
    ended: float
    code: int


@dataclass
class UnknownsLoop:
    """Sends an unknown recipient at a time, one SMTP session each, until stopped."""

    attempts: list[Attempt] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            addr = f"u{uuid.uuid4().hex[:12]}@{DOMAIN}"
            began = time.time()
            try:
                code = send(25, SENDER, [addr], None, host=HOST, timeout=60).code(addr)
            except OSError as exc:  # smtplib's errors are OSErrors
                self.errors.append(repr(exc))
                continue
            self.attempts.append(Attempt(began, time.time(), code))
            self._stop.wait(0.05)  # a steady trickle, not a flood

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    old, new = debpkg.built_previous(), debpkg.built()
    assert not listening(OLD_MILTER_PORT, OLD_MILTER_HOST), "127.0.0.1:8895 is taken here"
    with prepared(HOST, "callahead-upgrade", [old, new]) as system:
        # main.cf as 0.1.0's README had it: the milter on its default TCP listener.
        system.sh(
            f"postconf -e 'smtpd_milters = inet:{OLD_MILTER_HOST}:{OLD_MILTER_PORT}'"
            " && postfix reload"
        )
        apt_install(system, old)
        box = Box(system, old, new)
        box.first_install = (
            system.sh("systemctl is-enabled callahead", check=False).strip(),
            system.sh("systemctl is-active callahead", check=False).strip(),
        )
        env = callahead_env().replace(BACKUP_HOST, HOST)
        assert "CALLAHEAD_SOCKET" not in env
        (system.container.root / "etc/default/callahead").write_text(env)
        system.sh("systemctl enable --now callahead")
        system.wait_active()
        assert installed_version(system) == debpkg.version(debpkg.PREVIOUS_RELEASE)
        yield box


def rcpt_code(addr: str) -> int:
    return send(25, SENDER, [addr], None, host=HOST).code(addr)


def installed_version(system: System) -> str:
    return system.sh("dpkg-query -W -f='${Version}' callahead").strip()


def restart_window(system: System) -> tuple[float, float]:
    """Wall-clock times of systemd's last "Stopping" of callahead and of the "Started"
    (READY=1) after it, from the journal."""
    lines = system.sh("journalctl -u callahead -o json --no-pager").splitlines()
    events = [json.loads(line) for line in lines]
    stopping = [e for e in events if str(e.get("MESSAGE", "")).startswith("Stopping ")]
    assert stopping, "no stop in the journal"
    stop = int(stopping[-1]["__REALTIME_TIMESTAMP"]) / 1e6
    started = [
        int(e["__REALTIME_TIMESTAMP"]) / 1e6
        for e in events
        if str(e.get("MESSAGE", "")).startswith("Started ")
        and int(e["__REALTIME_TIMESTAMP"]) / 1e6 > stop
    ]
    assert started, "no start after the stop in the journal"
    return stop, started[0]


def test_a_first_install_neither_enables_nor_starts_it(box: Box) -> None:
    # /etc/default/callahead names example primaries until the operator edits it.
    assert box.first_install == ("disabled", "inactive")


def test_an_upgrade_while_mail_flows_restarts_it_with_its_cache(box: Box) -> None:
    system = box.system
    for addr in KNOWN[:2]:
        assert rcpt_code(addr) == 250
    pid = system.wait_active()
    loop = UnknownsLoop()
    sender = threading.Thread(target=loop.run, name="unknowns")
    sender.start()
    try:
        wait_for(lambda: len(loop.attempts) >= 5, 30.0, what="unknowns before the upgrade")
        box.upgrade_output = system.sh(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends"
            f" -o Dpkg::Options::=--force-confold /root/{box.new.name} 2>&1",
            timeout=300,
        )
        upgraded = time.time()
        wait_for(
            lambda: sum(a.began > upgraded + SLACK for a in loop.attempts) >= 5,
            30.0,
            what="unknowns after the upgrade",
        )
    finally:
        loop.stop()
        sender.join(120)

    assert installed_version(system) == debpkg.version()
    # Restarted by the postinst, not left stopped: a new process, ready.
    assert system.unit("ActiveState") == "active"
    assert system.wait_active() != pid
    assert not loop.errors, loop.errors
    assert {a.code for a in loop.attempts} <= {250, 550}, loop.attempts
    stop, started = restart_window(system)
    accepted = [a for a in loop.attempts if a.code == 250]
    print(
        f"\nupgrade: restart window {started - stop:.2f} s; {len(loop.attempts)} unknowns, "
        f"{len(accepted)} accepted unverified"
    )
    assert started - stop < RESTART_BOUND
    # Unverified only while callahead was restarting: no session outside the window.
    outside = [a for a in accepted if a.ended < stop - SLACK or a.began > started + SLACK]
    if outside:  # what callahead and Postfix did meanwhile, for the failure's reader
        print(system.sh("journalctl -o short-unix --no-pager | grep -v decision= | tail -150"))
    assert not outside, (outside, stop, started)
    # Refused before, and refused again after the upgrade.
    assert all(a.code == 550 for a in loop.attempts if a.ended < stop - SLACK)
    after = [a for a in loop.attempts if a.began > started + SLACK]
    assert after and all(a.code == 550 for a in after), after
    # The cache file was kept, and its addresses are answered from it (no probe).
    cache = system.sh(f"cat {STATE[0]}/cache.json")
    assert all(addr in cache for addr in KNOWN[:2]), cache
    probes = system.primary.probes_for(KNOWN[0])
    assert rcpt_code(KNOWN[0]) == 250
    assert system.primary.probes_for(KNOWN[0]) == probes


def test_the_upgrade_kept_the_listener_postfix_names(box: Box) -> None:
    """0.1.0 with CALLAHEAD_SOCKET unset listened on inet:127.0.0.1:8895 and main.cf
    names it: after the upgrade callahead still listens there (the postinst's drop-in),
    says so at the upgrade and warns at start that every local user can reach it."""
    system = box.system
    assert "kept the 0.1 milter listener inet:127.0.0.1:8895" in box.upgrade_output
    assert "CALLAHEAD_SOCKET=inet:127.0.0.1:8895" in system.sh(f"cat {DROPIN}")
    assert "inet:127.0.0.1:8895" in system.unit("Environment")
    assert listening(OLD_MILTER_PORT, OLD_MILTER_HOST)
    journal = system.journal()
    assert "every local user" in journal, journal[-2000:]
    assert system.sh("zcat /usr/share/doc/callahead/NEWS.Debian.gz").count("0.1-tcp-listener")


def test_an_upgrade_leaves_a_stopped_disabled_unit_stopped(box: Box) -> None:
    system = box.system
    system.sh("systemctl disable --now callahead")
    try:
        system.sh(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --reinstall"
            f" -o Dpkg::Options::=--force-confold /root/{box.new.name}",
            timeout=300,
        )
        assert system.unit("ActiveState") == "inactive"
    finally:
        system.sh("systemctl enable --now callahead")
    system.wait_active()


def test_remove_stops_it_and_keeps_its_state(box: Box) -> None:
    system = box.system
    pid = system.wait_active()
    system.sh("DEBIAN_FRONTEND=noninteractive apt-get remove -y -q callahead", timeout=120)
    assert system.sh(f"test -e /proc/{pid} && echo running || echo gone").strip() == "gone"
    assert system.sh("pgrep -f '[c]allahead serve' || true").strip() == ""
    # A reinstall finds its cache; the operator's configuration stays until purge.
    assert system.sh(f"test -s {STATE[0]}/cache.json && echo kept").strip() == "kept"
    assert system.sh(f"test -d {SOCKET_DIR} && echo kept").strip() == "kept"


def test_purge_removes_the_state_and_the_socket_directory(box: Box) -> None:
    system = box.system
    system.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -q callahead", timeout=120)
    # cache.json lists valid addresses: it must not outlive the package.
    for path in (*STATE, SOCKET_DIR, "/etc/default/callahead", DROPIN):
        assert system.sh(f"test -e {path} || test -L {path} && echo left || true").strip() == "", (
            path
        )
    wants = "/etc/systemd/system/multi-user.target.wants/callahead.service"
    assert system.sh(f"test -L {wants} && echo left || true").strip() == ""
