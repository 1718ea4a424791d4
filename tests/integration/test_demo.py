"""The README's quick start: ``./dev demo`` must keep working as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_and_shows_every_step() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "tests.demo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "FAILED" not in out
    assert "S: 550 5.1.1 Recipient address rejected: User unknown" in out
    assert "waits in the backup's deferred queue" in out
    assert "delivered to bob's mailbox; the backup's queue is empty" in out
