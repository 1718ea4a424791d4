"""Ready means ready (issue 26, item 7), and the unit's bounds (item 4), in the booted
container of conftest.py.

``Type=notify``: ``systemctl start`` returns once callahead sends READY=1. Before the
fix READY=1 went out before libmilter had bound its socket, and a connection right after
it was refused in 4 of 5 runs; Postfix then applies ``milter_default_action = accept``
to that session's recipients. And ``Before=postfix.service`` ordered the unit only
against Debian's oneshot wrapper, not ``postfix@-.service``, which runs smtpd."""

from __future__ import annotations

import json

from .conftest import SOCKET_DIR, System

RESTARTS = 5
CONNECT_AFTER_START = f"""
import json, socket, subprocess, time
results = []
for _ in range({RESTARTS}):
    subprocess.run(["systemctl", "stop", "callahead"], check=True)
    subprocess.run(["systemctl", "start", "callahead"], check=True)
    returned = time.monotonic()
    answers = {{}}
    for name in ("milter.sock", "policy.sock"):
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect("{SOCKET_DIR}/" + name)
            answers[name] = "accepted"
        except OSError as exc:
            answers[name] = str(exc)
        finally:
            sock.close()
    answers["after"] = time.monotonic() - returned
    results.append(answers)
print(json.dumps(results))
"""
"""Stop and start callahead, and connect to both sockets the moment ``systemctl start``
returns (no interpreter start in between): as smtpd would, the instant it is ready."""


def test_both_sockets_accept_the_moment_start_returns(system: System) -> None:
    done = system.container.run(["python3", "-c", CONNECT_AFTER_START], timeout=300)
    results = json.loads(done.stdout)
    print(results)
    assert len(results) == RESTARTS
    for answers in results:
        assert answers["milter.sock"] == "accepted", results
        assert answers["policy.sock"] == "accepted", results
        assert answers["after"] < 1.0  # right after start returned, not later
    system.wait_active()


def test_the_unit_starts_before_postfixs_smtpd(system: System) -> None:
    # Debian's postfix.service is a oneshot wrapper; smtpd runs under postfix@-.service.
    assert system.sh("systemctl is-active postfix@-.service").strip() == "active"
    before = system.unit("Before").split()
    assert {"postfix.service", "postfix@-.service"} <= set(before), before
    after = system.sh("systemctl show -p After --value postfix@-.service").split()
    assert "callahead.service" in after, after


def test_the_process_has_the_units_bounds(system: System) -> None:
    assert system.unit("LimitNOFILE") == "65536"
    assert system.unit("TasksMax") == "4096"
    # systemd sets it as far as its own hard limit goes (the one the container was
    # started with: a test host's shell may have less than a real PID 1's 524288).
    ceiling = open_files(system, 1)[1]
    expected = min(65536, ceiling)
    assert expected > 1024, ceiling
    assert open_files(system, system.wait_active()) == (expected, expected)


def open_files(system: System, pid: int) -> tuple[int, int]:
    """The soft and hard limits on open files of ``pid`` in the container."""
    limits = system.sh(f"cat /proc/{pid}/limits")
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)
