"""callahead as an operator runs it: installed with apt from its .deb, started by its own
unit under systemd, attached to Debian's chrooted Postfix through unix sockets (see
conftest.py). The tests share one container and run in this order."""

from __future__ import annotations

import re
import subprocess
import time
import uuid

from tests.harness.client import make_message, send
from tests.harness.waiting import wait_for

from .conftest import BACKUP_HOST, DOMAIN, KNOWN, POLICY_PORT, SOCKET_DIR, System

SENDER = "sender@remote.test"
TIMEOUT_STOP_SEC = 15.0
WATCHDOG_SEC = 30.0


def new_address(domain: str = DOMAIN) -> str:
    return f"u{uuid.uuid4().hex[:12]}@{domain}"


def rcpt_code(addr: str, port: int = 25) -> int:
    _token, body = make_message(SENDER, [addr])
    return send(port, SENDER, [addr], body, host=BACKUP_HOST).code(addr)


def test_the_package_came_from_debian_alone(system: System) -> None:
    # Nothing of pip in the container, and every library callahead imports is Debian's.
    assert "ok installed" not in system.sh(
        "dpkg-query -W -f='${Status}' python3-pip 2>/dev/null || true"
    )
    out = system.sh(
        "python3 -c 'import callahead, Milter, aiosmtplib, cachetools, prometheus_client, "
        "dns, redis, idna; print(*(m.__file__ for m in (callahead, Milter, aiosmtplib, "
        "cachetools, prometheus_client, dns, redis, idna)))'"
    )
    assert all(p.startswith("/usr/lib/python3/dist-packages/") for p in out.split()), out
    assert system.sh("dpkg -S /usr/bin/callahead").startswith("callahead:")
    # The conffile, edited by the operator, stays root's: it may hold a Redis password.
    assert system.sh("stat -c '%a %U' /etc/default/callahead").split() == ["640", "root"]


def test_the_sockets_belong_to_the_units_user_and_postfix(system: System) -> None:
    pid = system.wait_active()
    uid = system.sh(f"awk '/^Uid:/ {{print $2}}' /proc/{pid}/status").strip()
    assert 61184 <= int(uid) <= 65519  # systemd's range for dynamic users
    for name in ("milter.sock", "policy.sock"):
        stat = system.sh(f"stat -c '%A %u %G' {SOCKET_DIR}/{name}").split()
        assert stat == ["srwxrwx---", uid, "postfix"], (name, stat)
        # The reproduction, the other way round: smtpd's user connects.
        system.sh(
            "setpriv --reuid=postfix --regid=postfix --init-groups python3 -c "
            f"'import socket; socket.socket(socket.AF_UNIX).connect(\"{SOCKET_DIR}/{name}\")'"
        )


def test_known_user_250_unknown_user_550_through_the_milter(system: System) -> None:
    assert rcpt_code(KNOWN[0]) == 250
    assert system.primary.probes_for(KNOWN[0]) == 1
    unknown = new_address()
    assert rcpt_code(unknown) == 550
    wait_for(lambda: system.primary.mailbox(KNOWN[0]), 30.0, what="relayed to the primary")


def test_the_policy_service_answers_through_the_chroot_too(system: System) -> None:
    assert rcpt_code(KNOWN[1], POLICY_PORT) == 250
    assert rcpt_code(new_address(), POLICY_PORT) == 550


def test_the_decision_lines_are_in_the_journal(system: System) -> None:
    unknown = new_address()
    assert rcpt_code(unknown) == 550
    local = unknown.split("@")[0]

    def logged() -> bool:
        text = system.journal()
        return any(
            local in line and "decision=reject" in line and "reason=probe_unknown" in line
            for line in text.splitlines()
        )

    wait_for(logged, 10.0, what="the reject line in the journal")
    assert re.search(r"decision=accept reason=probe_valid", system.journal())


def doctor(system: System) -> subprocess.CompletedProcess[str]:
    """``callahead doctor`` as the README has the operator run it after installing: no
    arguments (it reads /etc/default/callahead and /etc/postfix)."""
    done = system.container.run(["callahead", "doctor"], check=False, timeout=120)
    print(f"\n# callahead doctor (exit {done.returncode})\n{done.stdout}{done.stderr}")
    return done


def failed_items(done: subprocess.CompletedProcess[str]) -> set[str]:
    return {
        line.split(":")[0].removeprefix("FAIL ")
        for line in done.stdout.splitlines()
        if line.startswith("FAIL")
    }


def test_doctor_passes_the_installation_as_the_readme_has_it(system: System) -> None:
    # A user verified earlier (through the milter) is doctor's real address: no --known.
    assert rcpt_code(KNOWN[0]) == 250
    done = doctor(system)

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for name in ("milter.sock", "policy.sock"):
        assert f"chrooted, {SOCKET_DIR}/{name} reachable as postfix" in out, name
    probed = re.search(r"^ok   probe: (\S+) is valid", out, re.M)
    assert probed and probed[1] in KNOWN, out  # one the cache holds, not postmaster@
    assert "unknown: refused with 550" in out
    assert out.rstrip().endswith("all items pass")


def test_doctor_fails_a_socket_path_that_ignores_the_chroot(system: System) -> None:
    """The path that works for every program but a chrooted smtpd."""
    good = system.sh("postconf -h smtpd_milters").strip()
    system.sh(f"postconf -e 'smtpd_milters = unix:{SOCKET_DIR}/milter.sock'")
    try:
        done = doctor(system)
    finally:
        system.sh(f"postconf -e 'smtpd_milters = {good}'")

    assert done.returncode == 1
    assert failed_items(done) == {"hook"}, done.stdout
    assert "smtpd runs chrooted in /var/spool/postfix" in done.stdout
    assert "fix: name it relative to the queue directory: unix:callahead/milter.sock" in done.stdout


def test_doctor_fails_a_socket_postfix_cannot_open(system: System) -> None:
    """The issue's failure seen from a live installation: the socket is there and
    callahead listens, but the postfix user may not connect."""
    system.sh(f"chmod 0700 {SOCKET_DIR}")
    try:
        done = doctor(system)
    finally:
        system.sh(f"chmod 0770 {SOCKET_DIR}")

    assert done.returncode == 1
    assert failed_items(done) == {"hook"}, done.stdout
    assert done.stdout.count("Postfix cannot connect") == 2  # the milter and the policy hook
    assert "fix: run callahead with Group=postfix and UMask=0007" in done.stdout


def test_mail_is_queued_while_the_primary_is_down(system: System) -> None:
    system.primary.stop()
    try:
        addr = new_address()
        assert rcpt_code(addr) == 250
        queue = system.sh("postqueue -j")
        assert addr in queue, queue
    finally:
        system.primary.start()


def test_reload_rereads_the_routes(system: System) -> None:
    """A domain added to relay_domains and transport_maps is verified after
    ``systemctl reload callahead`` (SIGHUP), not before."""
    other = "other.test"
    transport = system.sh("postconf -h transport_maps").strip()
    inner = transport.removeprefix("inline:{").removesuffix("}")
    nexthop = inner.split("=", 1)[1]
    system.sh(
        f"postconf -e 'relay_domains = {DOMAIN} {other}' "
        f"'transport_maps = inline:{{{inner}, {other}={nexthop}}}' && postfix reload"
    )
    # Postfix takes the new domain; callahead has no route for it yet: not verified.
    assert rcpt_code(new_address(other)) == 250
    pid = system.wait_active()
    system.sh("systemctl reload callahead")
    assert system.wait_active() == pid  # reloaded, not restarted
    # The primary does not know anyone at other.test: now each one is refused.
    wait_for(lambda: rcpt_code(new_address(other)) == 550, 10.0, what="the new route")


def test_stop_exits_cleanly_within_timeout_stop_sec(system: System) -> None:
    started = time.monotonic()
    system.sh("systemctl stop callahead", timeout=TIMEOUT_STOP_SEC + 10)
    took = time.monotonic() - started
    assert took < TIMEOUT_STOP_SEC
    assert system.unit("Result") == "success"
    assert system.unit("ExecMainStatus") == "0"
    assert "callahead stopped" in system.journal()
    system.sh("systemctl start callahead")
    system.wait_active()


def test_the_cache_file_survives_a_restart(system: System) -> None:
    addr = KNOWN[2]
    assert rcpt_code(addr) == 250
    probes = system.primary.probes_for(addr)
    system.sh("systemctl restart callahead", timeout=60)
    system.wait_active()
    # DynamicUser keeps the StateDirectory under /var/lib/private.
    assert system.sh("test -s /var/lib/private/callahead/cache.json && echo yes").strip() == "yes"
    assert rcpt_code(addr) == 250
    assert system.primary.probes_for(addr) == probes  # answered from the saved cache


def test_a_stopped_process_is_restarted_by_the_watchdog(system: System) -> None:
    pid = system.wait_active()
    restarts = int(system.unit("NRestarts"))
    system.sh(f"kill -STOP {pid}")

    def restarted() -> bool:
        return int(system.unit("NRestarts")) > restarts and system.unit("ActiveState") == "active"

    wait_for(restarted, WATCHDOG_SEC + 30.0, interval=0.5, what="a watchdog restart")
    assert system.wait_active() != pid
    assert "Watchdog timeout" in system.sh("journalctl -u callahead --no-pager -o cat -n 200")
    assert rcpt_code(new_address()) == 550


def test_a_socket_postfix_cannot_use_stops_the_start(system: System) -> None:
    """The issue's configuration: postfix only a supplementary group. callahead refuses
    to start (exit 78, no restart loop), saying why."""
    dropin = "/etc/systemd/system/callahead.service.d"
    system.sh(
        f"mkdir -p {dropin} && printf '[Service]\\nGroup=\\nSupplementaryGroups=postfix\\n' "
        f">{dropin}/issue19.conf && systemctl daemon-reload"
    )
    try:
        system.sh("systemctl restart callahead", check=False, timeout=60)
        wait_for(lambda: system.unit("ActiveState") == "failed", 20.0, what="the unit failed")
        assert system.unit("ExecMainStatus") == "78"
        assert "Postfix could not connect" in system.journal()
    finally:
        system.sh(f"rm -rf {dropin} && systemctl daemon-reload && systemctl reset-failed callahead")
        system.sh("systemctl start callahead")
        system.wait_active()
