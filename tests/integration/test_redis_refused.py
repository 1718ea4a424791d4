"""A Redis URL that callahead 0.1 took, and that is no longer used (off loopback without a
password, a user name without one), does not stop ``callahead serve`` after an upgrade:
it starts, says at start why the shared cache is off and what to write instead, and
verifies every recipient alone. (Exit 78 there left Postfix accepting everything
unverified: the unit does not restart on 78, and the package's restart does not fail.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import ask_policy
from tests.harness.primary import Primary
from tests.integration.conftest import ONE_USER

KNOWN = ONE_USER


@pytest.mark.parametrize(
    ("url", "shown", "why"),
    [
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0", "Redis at 10.0.0.5 is off"),
        ("redis://S3cretPW@10.0.0.5", "redis://***@10.0.0.5", "a user name without a password"),
    ],
    ids=["no-password", "user-only"],
)
def test_serve_starts_without_the_shared_cache_and_verifies_alone(
    workdir: Path, known_primary: Primary, url: str, shown: str, why: str
) -> None:
    process = CallaheadProcess(
        workdir,
        {
            "CALLAHEAD_ROUTES": "example.test=[{}]:{}".format(*known_primary.address),
            "CALLAHEAD_REDIS_URL": url,
        },
    )
    process.start()
    try:
        assert ask_policy(process.policy_port, "stranger@example.test").startswith(
            b"action=550 5.1.1"
        )
        assert ask_policy(process.policy_port, KNOWN) == b"action=DUNNO\n\n"
        assert known_primary.probes_for(KNOWN) == 1
        log = process.log()
    finally:
        process.stop()
    [error] = [line for line in log.splitlines() if " ERROR " in line]
    assert f"CALLAHEAD_REDIS_URL={shown} is not used: {why}" in error
    assert "redis://:PASSWORD@HOST" in error
    assert "the shared cache is off" in error
    assert "shared cache: off;" in log  # the start line
    assert "S3cretPW" not in log
