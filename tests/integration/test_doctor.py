"""``callahead doctor`` against a real Postfix backup configuration (read by Postfix's
own postconf), a running callahead and a real Postfix primary without postmaster@:
the good setup passes every item; each configuration broken in one way fails with the
item that names it, and exit status 1."""

from __future__ import annotations

import grp
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import StartScripted, make_workdir, scripted
from tests.harness.ports import free_port
from tests.harness.postfix import Listener, PostfixInstance, backup_mx_main_cf, primary_main_cf
from tests.harness.scripted import exim_without_postmaster

__all__ = ["scripted"]

DOMAIN = "doc.test"
USER = f"u1@{DOMAIN}"


@dataclass
class Rig:
    workdir: Path
    callahead: CallaheadProcess
    primary_port: int
    helo_port: int
    client_port: int

    def backup(self, name: str, **overrides: str) -> Path:
        """A backup configuration from the production snippet, with ``overrides``;
        its directory (written, not started: doctor reads it with postconf)."""
        workdir = self.workdir / name
        settings = backup_mx_main_cf(
            workdir=workdir,
            relay_domains=[DOMAIN],
            transports={DOMAIN: f"[127.0.0.1]:{self.primary_port}"},
            milter=self.callahead.socket,
        )
        settings.update(overrides)
        PostfixInstance(workdir, settings, [Listener(free_port())]).write_config()
        return workdir / "etc"

    def doctor(self, config_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "callahead",
                "doctor",
                "--env-file=",
                "--postfix",
                str(config_dir),
                *args,
            ],
            env={**self.callahead.env, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    if os.geteuid() != 0:
        pytest.skip("the integration tests run a real Postfix, whose master needs root")
    with make_workdir() as workdir:
        primary_dir = workdir / "primary"
        primary_dir.mkdir(mode=0o755)
        ports = {"plain": free_port(), "helo": free_port(), "client": free_port()}
        primary = PostfixInstance(
            primary_dir,
            primary_main_cf(workdir=primary_dir, users=[USER], hostname="doc-primary.test"),
            [
                Listener(ports["plain"]),
                Listener(
                    ports["helo"], {"smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname"}
                ),
                Listener(
                    ports["client"],
                    {"smtpd_client_restrictions": "check_client_access inline:{127.0.0.1=REJECT}"},
                ),
            ],
        )
        callahead = CallaheadProcess(
            workdir,
            {
                "CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{ports['plain']}",
                "CALLAHEAD_PROBE_TIMEOUT": "3",
                "CALLAHEAD_CATCHALL_CHECK": "0",
            },
        )
        primary.start()
        try:
            callahead.start()
            try:
                yield Rig(workdir, callahead, ports["plain"], ports["helo"], ports["client"])
            finally:
                callahead.stop()
        finally:
            primary.stop()


def failed(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stdout.splitlines() if line.startswith("FAIL")]


def test_the_good_setup_passes_every_item(rig: Rig) -> None:
    """Over TCP (asked for: the rig sets CALLAHEAD_SOCKET=inet:...): every item passes,
    and the exposure item warns, for the milter and the policy service, that every
    local user can reach them, as the start line did."""
    done = rig.doctor(rig.backup("good"), "--known", USER)

    assert done.returncode == 0, done.stdout + done.stderr
    assert failed(done) == []
    out = done.stdout
    assert "callahead answers there" in out
    warned = [line for line in out.splitlines() if line.startswith("warn")]
    assert [line.split(" is a TCP port")[0] for line in warned] == [
        f"warn exposure: milter CALLAHEAD_SOCKET={rig.callahead.socket}",
        f"warn exposure: policy CALLAHEAD_POLICY_LISTEN={rig.callahead.policy_service}",
    ], out
    assert all("every local user can reach" in line for line in warned)
    assert "fix: use the unix socket instead: CALLAHEAD_SOCKET=unix:" in out
    for variable in ("CALLAHEAD_SOCKET", "CALLAHEAD_POLICY_LISTEN"):
        assert f"{variable}=inet:127.0.0.1:" in rig.callahead.log()  # the start line
    assert "every local user can reach" in rig.callahead.log()
    assert "ok   default-action:" in out
    assert "ok   answer-time:" in out
    assert "ok   rcpt-macros:" in out
    assert f"ok   routes: {DOMAIN} -> [127.0.0.1]:{rig.primary_port}" in out
    assert f"ok   probe: {USER} is valid" in out
    assert "unknown: refused with 550" in out
    assert out.rstrip().endswith("all items pass, 2 with a warning")


def controls_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    lines = done.stdout.splitlines()
    found = []
    for n, line in enumerate(lines):
        if " controls: " in line:
            fix = (
                lines[n + 1] if n + 1 < len(lines) and lines[n + 1].startswith("     fix:") else ""
            )
            found.append(f"{line}\n{fix}".rstrip())
    return found


def test_a_bare_primary_without_postmaster_gets_a_control_asked_for(
    rig: Rig, scripted: StartScripted
) -> None:
    """Exim's texts, no postmaster@ (issue 27, item 6): a warning naming the gap and
    the variable that closes it; with CALLAHEAD_CONTROLS set, its address is probed
    and the warning is gone."""
    bare = scripted(exim_without_postmaster([USER]))
    routes = {"CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{bare.port}"}
    config = rig.backup("bare")

    done = rig.doctor(config, "--known", USER, **routes)
    assert failed(done) == [], done.stdout
    assert controls_lines(done) == [
        f"warn controls: {DOMAIN}: the primary's rejections carry no enhanced status code "
        f"(a bare 550) and it refuses postmaster@ (550 Unrouteable address): until "
        f"callahead has verified a user of {DOMAIN}, its unknown recipients are accepted"
        f"\n     fix: name a user known to exist: CALLAHEAD_CONTROLS=user@{DOMAIN}"
    ], done.stdout
    assert f"postmaster@{DOMAIN}" in bare.rcpts()

    done = rig.doctor(config, **routes, CALLAHEAD_CONTROLS=USER)
    assert done.returncode == 0, done.stdout
    assert controls_lines(done) == [f"ok   controls: {USER} (CALLAHEAD_CONTROLS) is accepted"]
    assert f"ok   probe: {USER} is valid" in done.stdout  # the real address, unasked for


def test_a_control_the_primary_refuses_fails(rig: Rig) -> None:
    gone = f"gone@{DOMAIN}"
    done = rig.doctor(rig.backup("gone"), CALLAHEAD_CONTROLS=f"{gone} it@elsewhere.test")
    assert done.returncode == 1
    lines = controls_lines(done)
    assert lines[0].startswith(
        f"FAIL controls: CALLAHEAD_CONTROLS names {gone}, which the "
        "primary does not accept (unknown: 550 5.1.1"
    ), done.stdout
    assert lines[0].endswith(f"fix: name a user of {DOMAIN} that exists in CALLAHEAD_CONTROLS")
    assert lines[1].startswith(
        "warn controls: CALLAHEAD_CONTROLS names it@elsewhere.test, but elsewhere.test is "
        "not a relay domain with a route: it is never asked"
    ), done.stdout


def test_an_explicit_primary_needs_no_control(rig: Rig) -> None:
    """Postfix's 550 5.1.1 is believed on its own: no controls line at all."""
    done = rig.doctor(rig.backup("explicit"), "--known", USER)
    assert controls_lines(done) == [], done.stdout


class UnixCallahead(CallaheadProcess):
    """callahead on unix sockets in a directory like the package's (root:postfix 0770),
    run as the unit runs it: the postfix group as its primary group, UMask=0007."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        sockets = workdir / "spool-callahead"
        sockets.mkdir()
        os.chown(sockets, 0, grp.getgrnam("postfix").gr_gid)
        sockets.chmod(0o770)
        self.milter_path = sockets / "milter.sock"
        self.policy_path = sockets / "policy.sock"
        env = {
            **env,
            "CALLAHEAD_SOCKET": f"unix:{self.milter_path}",
            "CALLAHEAD_POLICY_LISTEN": f"unix:{self.policy_path}",
        }
        super().__init__(workdir, env, name="unix-callahead")
        umask = 'umask 0007 && exec "$0" "$@"'
        self.argv = ["setpriv", "--regid=postfix", "--clear-groups", "sh", "-c", umask, *self.argv]

    def _ready(self) -> bool:
        return all(_accepts(path) for path in (self.milter_path, self.policy_path))

    @property
    def socket(self) -> str:
        return f"unix:{self.milter_path}"

    @property
    def policy_service(self) -> str:
        return f"unix:{self.policy_path}"


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def test_unix_sockets_only_postfix_can_reach_pass_without_a_warning(rig: Rig) -> None:
    """The package's way: unix sockets in a root:postfix 0770 directory, named in
    main.cf (this test Postfix is not chrooted: by their paths)."""
    unix = UnixCallahead(rig.workdir, {k: v for k, v in rig.callahead.env.items() if k in KEPT})
    unix.start()
    try:
        config = rig.backup(
            "unix",
            smtpd_milters=unix.socket,
            smtpd_recipient_restrictions=(
                f"permit_mynetworks, reject_unauth_destination, "
                f"check_policy_service {unix.policy_service}"
            ),
            smtpd_policy_service_default_action="DUNNO",
        )
        done = rig.doctor(config, "--known", USER, **unix.env)
    finally:
        unix.stop()

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for path in (unix.milter_path, unix.policy_path):
        assert f"{path} reachable as postfix" in out
    directory = unix.milter_path.parent
    keeps_out = f"{directory} (drwxrwx--- root:postfix) keeps every other local user out"
    assert f"ok   exposure: milter {unix.socket}: {keeps_out}" in out
    assert f"ok   exposure: policy {unix.policy_service}: {keeps_out}" in out
    assert not [line for line in out.splitlines() if line.startswith(("warn", "FAIL"))], out
    assert out.rstrip().endswith("all items pass")
    assert "every local user can reach" not in unix.log()


KEPT = ("CALLAHEAD_ROUTES", "CALLAHEAD_PROBE_TIMEOUT", "CALLAHEAD_CATCHALL_CHECK")
"""The rig's own settings, which a second callahead takes too."""


def test_without_a_known_user_postmaster_is_asked_and_its_absence_named(rig: Rig) -> None:
    done = rig.doctor(rig.backup("nopm"))

    assert done.returncode == 1
    lines = failed(done)
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith(f"FAIL probe: postmaster@{DOMAIN} is unknown"), done.stdout
    assert f"fix: name a real user: callahead doctor --known user@{DOMAIN}" in done.stdout


def test_the_policy_service_after_the_relay_check_passes(rig: Rig) -> None:
    config = rig.backup(
        "policy",
        smtpd_milters="",
        smtpd_recipient_restrictions=(
            f"permit_mynetworks, reject_unauth_destination, "
            f"check_policy_service {rig.callahead.policy_service}"
        ),
        smtpd_policy_service_default_action="DUNNO",
    )
    done = rig.doctor(config, "--known", USER)

    assert done.returncode == 0, done.stdout
    assert "ok   policy-order:" in done.stdout


BROKEN = {
    # case: (main.cf overrides (callahead's env), the failed item, words of its line)
    "tempfail": ({"milter_default_action": "tempfail"}, {}, "default-action", "tempfail"),
    "timeout": ({"milter_command_timeout": "5s"}, {}, "answer-time", "= 5s"),
    "macros": ({"milter_protocol": "2"}, {}, "rcpt-macros", "{client_addr}"),
    "elsewhere": ({"smtpd_milters": "inet:127.0.0.1:9"}, {}, "hook", "attaches callahead"),
    "unrouted": ({"relay_domains": f"{DOMAIN}, other.test"}, {}, "routes", "other.test"),
    "order": (
        {
            "smtpd_milters": "",
            "smtpd_relay_restrictions": "",
            "smtpd_recipient_restrictions": "check_policy_service {policy}, "
            "reject_unauth_destination",
            "smtpd_policy_service_default_action": "DUNNO",
        },
        {},
        "policy-order",
        "before any reject_unauth_destination",
    ),
    "down": (
        {},
        {"CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{{dead}}"},
        "primary",
        "cannot be reached",
    ),
    "helo": (
        {},
        {"CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{{helo}}", "CALLAHEAD_HELO_NAME": "backup"},
        "primary",
        "refuses the EHLO name 'backup'",
    ),
    "client": (
        {},
        {"CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{{client}}"},
        "prober",
        "refuses the prober",
    ),
    "redis": ({}, {"CALLAHEAD_REDIS_URL": "redis://10.0.0.5:6379/0"}, "redis", "no password"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_configuration_broken_in_one_way_fails_that_item(rig: Rig, case: str) -> None:
    postfix, env, item, words = BROKEN[case]
    values = {
        "policy": rig.callahead.policy_service,
        "dead": str(free_port()),
        "helo": str(rig.helo_port),
        "client": str(rig.client_port),
    }
    config = rig.backup(case, **{k: v.format(**values) for k, v in postfix.items()})
    done = rig.doctor(config, "--known", USER, **{k: v.format(**values) for k, v in env.items()})

    assert done.returncode == 1, done.stdout
    lines = failed(done)
    assert lines, done.stdout
    assert {line.split(":")[0] for line in lines} == {f"FAIL {item}"}, done.stdout
    assert any(words in line for line in lines), done.stdout
    assert "fix: " in done.stdout
