"""A Redis URL that callahead 0.1 took, and that is no longer used (off loopback without a
password, a user name without one), does not stop ``callahead serve`` after an upgrade:
it starts, says at start why the shared cache is off and what to write instead, and
verifies every recipient alone. (Exit 78 there left Postfix accepting everything
unverified: the unit does not restart on 78, and the package's restart does not fail.)"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir
from tests.harness.primary import Primary

KNOWN = "known@example.test"


@pytest.fixture
def primary() -> Iterator[Primary]:
    server = Primary([KNOWN], hostname="primary.test")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with make_workdir() as path:
        yield path


def ask_policy(process: CallaheadProcess, recipient: str) -> bytes:
    with socket.create_connection(("127.0.0.1", process.policy_port), timeout=30) as conn:
        conn.sendall(
            b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.7\n"
            + f"recipient={recipient}\n\n".encode()
        )
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize(
    ("url", "shown", "why"),
    [
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0", "Redis at 10.0.0.5 is off"),
        ("redis://S3cretPW@10.0.0.5", "redis://***@10.0.0.5", "a user name without a password"),
    ],
    ids=["no-password", "user-only"],
)
def test_serve_starts_without_the_shared_cache_and_verifies_alone(
    workdir: Path, primary: Primary, url: str, shown: str, why: str
) -> None:
    process = CallaheadProcess(
        workdir,
        {
            "CALLAHEAD_ROUTES": "example.test=[{}]:{}".format(*primary.address),
            "CALLAHEAD_REDIS_URL": url,
        },
    )
    process.start()
    try:
        assert ask_policy(process, "stranger@example.test").startswith(b"action=550 5.1.1")
        assert ask_policy(process, KNOWN) == b"action=DUNNO\n\n"
        assert primary.probes_for(KNOWN) == 1
        log = process.log()
    finally:
        process.stop()
    [error] = [line for line in log.splitlines() if " ERROR " in line]
    assert f"CALLAHEAD_REDIS_URL={shown} is not used: {why}" in error
    assert "redis://:PASSWORD@HOST" in error
    assert "the shared cache is off" in error
    assert "shared cache: off;" in log  # the start line
    assert "S3cretPW" not in log
