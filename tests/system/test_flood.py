"""An idle-connection flood against the installed service, in the booted container of
conftest.py (issue 26, item 4): about 1,000 idle connections to the milter ran a
process with the default 1024 descriptors out; asyncio then logged ``socket.accept()
out of system resource`` with a traceback each second, policy requests timed out, and
journald rate-limited the flood of lines, losing the decision lines with it.

Here a local root process opens ``FLOOD`` idle connections to each of the milter
socket, the policy socket and the metrics port (more than 1024 to the milter alone) and
holds them while mail goes through the container's Postfix, as the unit ships (its
``LimitNOFILE``, the milter and policy caps, the capped ``/metrics`` server)."""

from __future__ import annotations

import contextlib
import json
import re
import select
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

from tests.harness.client import make_message, send
from tests.harness.waiting import wait_for

from .conftest import BACKUP_HOST, DOMAIN, KNOWN, POLICY_PORT, SOCKET_DIR, System

SENDER = "sender@remote.test"
FLOOD = 1500
"""Idle connections to each listener: past the 1024 descriptors of a process without
the unit's ``LimitNOFILE`` with the milter's alone."""
SMTP_TIMEOUT = 20.0
"""Seconds an SMTP command may take: well under a second normally; Postfix waits 30 s
(``milter_command_timeout``) for a milter that does not answer before it accepts."""
FLOOD_SCRIPT = f"""
import errno, json, os, resource, socket, struct, sys
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
targets = {{
    "milter": (socket.AF_UNIX, "{SOCKET_DIR}/milter.sock"),
    "policy": (socket.AF_UNIX, "{SOCKET_DIR}/policy.sock"),
    "metrics": (socket.AF_INET, ("{BACKUP_HOST}", 9895)),
}}
held = {{name: [] for name in targets}}
report = {{"pid": os.getpid(), "errors": {{}}}}
for name, (family, address) in targets.items():
    for _ in range({FLOOD}):
        sock = socket.socket(family)
        # Blocking, so that a connect waits for room in a full listen backlog (a
        # non-blocking one to a unix socket fails at once), 5 s at most.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 5, 0))
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            report["errors"][name] = errno.errorcode.get(exc.errno or 0, str(exc))
            break
        held[name].append(sock)
    report[name] = len(held[name])
print(json.dumps(report), flush=True)
sys.stdin.read()  # held until the test closes its end (or goes away)
closed = {{}}
for name, socks in held.items():
    closed[name] = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            closed[name] += sock.recv(1) == b""
        except OSError:
            pass
        sock.close()
print(json.dumps({{"closed_by_the_service": closed}}), flush=True)
"""
"""Open ``FLOOD`` idle connections to each listener, say how many connected (a JSON
line), hold them until stdin ends, then say how many the service had closed."""
DECISION = re.compile(r"rcpt=<([^>]*)> decision=(\w+)")


def rcpt_codes(port: int, rcpts: list[str]) -> dict[str, int]:
    _token, body = make_message(SENDER, rcpts)
    sent = send(port, SENDER, rcpts, body, host=BACKUP_HOST, timeout=SMTP_TIMEOUT)
    return {rcpt: sent.code(rcpt) for rcpt in rcpts}


def new_address() -> str:
    return f"u{uuid.uuid4().hex[:12]}@{DOMAIN}"


def verdicts_through_both_hooks(system: System) -> dict[str, str]:
    """A known and an unknown recipient through the milter (port 25) and the policy
    service (port 2525); the decision each should get, by recipient."""
    expected: dict[str, str] = {}
    got: dict[str, dict[str, int]] = {}
    wanted: dict[str, dict[str, int]] = {}
    for hook, port, known in (("milter", 25, KNOWN[0]), ("policy", POLICY_PORT, KNOWN[1])):
        unknown = new_address()
        got[hook] = rcpt_codes(port, [known, unknown])
        wanted[hook] = {known: 250, unknown: 550}
        expected |= {known: "accept", unknown: "reject"}
    # A 250 for the unknown one: Postfix could not reach that hook (or waited it out)
    # and took its default action (milter_default_action, or the policy service's).
    assert got == wanted
    return expected


def decisions(text: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in text.splitlines() if (m := DECISION.search(line))]


def logged_decisions(system: System, cursor: str, count: int) -> list[tuple[str, str]]:
    """The decision lines in the journal after ``cursor``, once there are ``count``."""

    def logged() -> list[tuple[str, str]]:
        found = decisions(system.journal(cursor))
        return found if len(found) >= count else []

    return sorted(wait_for(logged, 10.0, what=f"{count} decision lines"))


def descriptors(system: System, pid: int) -> int:
    return int(system.sh(f"ls /proc/{pid}/fd | wc -l"))


def read_line(process: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if ready else ""
    if not line:
        raise AssertionError(f"no report from the flood within {timeout}s")
    report: dict[str, Any] = json.loads(line)
    return report


@contextlib.contextmanager
def flood(system: System) -> Iterator[dict[str, Any]]:
    """The flood script running in the container as root (all its namespaces, as
    ``Container.run``); its report once every connection is open. Ended on exit, on
    failure too: its stdin closed, killed if it does not go."""
    process = subprocess.Popen(
        [
            "nsenter",
            "-t",
            str(system.container.leader),
            "-a",
            "--",
            "env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "python3",
            "-c",
            FLOOD_SCRIPT,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    report: dict[str, Any] = {}
    try:
        report = read_line(process, 30.0)
        yield report
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            with contextlib.suppress(AssertionError):
                print(f"\nflood: {report} then {read_line(process, 10.0)}")
            process.wait(10)
        except subprocess.TimeoutExpired:
            if "pid" in report:
                system.sh(f"kill -KILL {int(report['pid'])}", check=False)
            process.kill()
            process.wait(10)
        finally:
            assert process.stdout is not None and process.stderr is not None
            process.stdout.close()
            if process.returncode:
                print(process.stderr.read())
            process.stderr.close()


def test_an_idle_connection_flood_leaves_the_verdicts_and_the_journal_intact(
    system: System,
) -> None:
    """While the flood is held, and after: each hook's verdicts, a decision line for
    each recipient and next to nothing else in the journal, the same process."""
    pid = system.wait_active()
    restarts = system.unit("NRestarts")
    cursor = system.cursor()
    with flood(system) as opened:
        assert opened["errors"] == {}, opened
        assert [opened[name] for name in ("milter", "policy", "metrics")] == [FLOOD] * 3
        expected = verdicts_through_both_hooks(system)
        # Held by callahead meanwhile: libmilter keeps each idle connection open (a
        # descriptor each, past the 1024 of a process without the unit's limit).
        assert descriptors(system, pid) > FLOOD, "the flood is not held"
        assert logged_decisions(system, cursor, len(expected)) == sorted(expected.items())
        during = system.journal(cursor)
        print(f"\n# the journal while the flood is held\n{during}")
        assert "Traceback" not in during
        others = [line for line in during.splitlines() if not DECISION.search(line)]
        assert len(others) <= 5, others  # a line per kind of refusal, not one per try
        assert system.unit("NRestarts") == restarts
        assert system.unit("MainPID") == str(pid)

    assert wait_for(lambda: descriptors(system, pid) < 200, 20.0, what="the flood let go")
    later = system.cursor()
    expected = verdicts_through_both_hooks(system)
    assert logged_decisions(system, later, len(expected)) == sorted(expected.items())
    text = system.journal(cursor)
    assert "Traceback" not in text
    assert len(text.splitlines()) < 50
    assert system.unit("NRestarts") == restarts
    assert system.unit("MainPID") == str(pid)
