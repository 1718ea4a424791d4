"""serve checks at start that the backup's Postfix names callahead where it listens
(process/hookcheck.py), reading a real Postfix configuration with Postfix's own
postconf (CALLAHEAD_POSTFIX_CONFIG): callahead on unix sockets as the package runs it,
and a main.cf that still names the TCP port of 0.1 is one ERROR line and
callahead_postfix_hooked 0 (fixed and SIGHUP'd: 1); the good setup is 1 and no error."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import Listener, PostfixInstance, backup_mx_main_cf
from tests.harness.waiting import wait_for
from tests.integration.test_doctor import UnixCallahead

DOMAIN = "hook.test"
NOT_HOOKED = "does not hook callahead where it listens"


@pytest.fixture
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("callahead runs with the postfix group, as the unit runs it: root only")
    with make_workdir() as path:
        yield path


def write_backup(workdir: Path, milter: str) -> Path:
    """A backup's configuration from the production snippet naming ``milter``; its
    config directory (written, not started: postconf reads it as serve does)."""
    settings = backup_mx_main_cf(
        workdir=workdir / "backup",
        relay_domains=[DOMAIN],
        transports={DOMAIN: f"[127.0.0.1]:{free_port()}"},
        milter=milter,
    )
    PostfixInstance(workdir / "backup", settings, [Listener(free_port())]).write_config()
    return workdir / "backup" / "etc"


def start_callahead(workdir: Path, postfix: Path) -> UnixCallahead:
    callahead = UnixCallahead(
        workdir,
        {
            "CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{free_port()}",
            "CALLAHEAD_CATCHALL_CHECK": "0",
            "CALLAHEAD_POSTFIX_CONFIG": str(postfix),
            "CALLAHEAD_LOG_LEVEL": "INFO",
        },
    )
    callahead.start()
    return callahead


def hooked(callahead: UnixCallahead) -> dict[str, float]:
    return {
        dict(labels)["frontend"]: value
        for (name, labels), value in callahead.samples().items()
        if name == "callahead_postfix_hooked"
    }


def lines(callahead: UnixCallahead, level: str) -> list[str]:
    return [line for line in callahead.log().splitlines() if f": {level} " in line]


def test_main_cf_naming_the_old_tcp_port_is_one_error_and_gauge_0_until_fixed(
    workdir: Path,
) -> None:
    port_a = free_port()
    config = write_backup(workdir, f"inet:127.0.0.1:{port_a}")
    callahead = start_callahead(workdir, config)
    try:
        # The gauge is set before the line is logged.
        wait_for(lambda: lines(callahead, "ERROR"), 10, what="the ERROR line")
        assert hooked(callahead) == {"milter": 0.0, "policy": 0.0}
        (error,) = lines(callahead, "ERROR")
        assert NOT_HOOKED in error
        assert f"name milters inet:127.0.0.1:{port_a} and no policy service" in error
        assert f"callahead listens: milter {callahead.socket}, policy service " in error
        assert f"fix: smtpd_milters = {callahead.socket} or check_policy_service" in error
        assert "callahead listening" in callahead.log(), "it serves all the same"

        # The operator fixes main.cf and reloads callahead.
        write_backup(workdir, callahead.socket)
        assert callahead.pid is not None
        os.kill(callahead.pid, signal.SIGHUP)
        wait_for(lambda: hooked(callahead).get("milter") == 1.0, 10, what="the gauge after SIGHUP")
    finally:
        callahead.stop()
    assert len(lines(callahead, "ERROR")) == 1
    assert "hooks callahead: milter " in callahead.log()


def test_the_good_setup_logs_no_error_and_gauge_1(workdir: Path) -> None:
    callahead_dir = workdir / "callahead"
    callahead_dir.mkdir(mode=0o755)
    port = free_port()
    settings = backup_mx_main_cf(
        workdir=workdir / "backup",
        relay_domains=[DOMAIN],
        transports={DOMAIN: f"[127.0.0.1]:{free_port()}"},
        milter=None,
    )
    backup = PostfixInstance(
        workdir / "backup",
        settings,
        [Listener(port, {"smtpd_milters": f"unix:{callahead_dir}/spool-callahead/milter.sock"})],
    )
    backup.write_config()
    callahead = start_callahead(callahead_dir, backup.config_dir)
    try:
        wait_for(lambda: hooked(callahead), 10, what="callahead_postfix_hooked")
        assert hooked(callahead) == {"milter": 1.0, "policy": 0.0}
    finally:
        callahead.stop()
    log = callahead.log()
    assert NOT_HOOKED not in log
    assert lines(callahead, "ERROR") == []
    assert (
        f"hooks callahead: milter {callahead.socket} named by 127.0.0.1:{port}/inet; "
        f"policy service {callahead.policy_service} named by no smtpd service (unused)"
    ) in log
