"""Operating callahead through a real Postfix backup: dry run, the admin socket
(``callahead cache`` and ``callahead status``), the cache file across a restart, and
refresh ahead. Every check looks at the real effect: what the sender was answered, what
the primary saw, what the running service says."""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import send
from tests.harness.waiting import wait_for

from .conftest import REFRESH_TTL, SENDER, MetricsDelta, Stack

LEFT = re.compile(r"cached, (\d+) s left")


def seconds_left(process: CallaheadProcess, address: str) -> float | None:
    """What ``callahead cache show`` says of ``address``: seconds left, or None."""
    shown = process.cli("cache", "show", address)
    if shown.returncode == 1:
        return None
    assert shown.returncode == 0, shown.stderr
    match = LEFT.search(shown.stdout)
    assert match, shown.stdout
    return float(match.group(1))


@pytest.fixture
def ops(stack: Stack) -> Iterator[CallaheadProcess]:
    """The ops profile's callahead, running again after the test if it stopped it, with
    its primary up."""
    process = stack.profiles["ops"].process
    yield process
    if not stack.ops_primary.running:
        stack.ops_primary.start()
    if process.pid is None or process.exited():
        process.stop()
        process.start()


@pytest.fixture
def port(stack: Stack) -> int:
    """The port of the ops profile's listener."""
    return stack.profiles["ops"].port


def test_dry_run_lets_an_unknown_user_through_and_logs_the_would_be_reject(
    stack: Stack,
) -> None:
    profile = stack.profiles["dryrun"]
    moved = MetricsDelta(profile.process)
    unknown = stack.new_address()
    known = stack.new_user()

    tx = send(profile.port, SENDER, [unknown, known])

    assert tx.code(unknown) == 250  # a reject decided, not given
    assert tx.code(known) == 250
    assert stack.primary.probes_for(unknown) == 1  # really judged by the primary
    log = profile.process.log()
    assert f"rcpt=<{unknown}> decision=reject reason=probe_unknown dry_run=yes" in log
    assert f"rcpt=<{known}> decision=accept reason=probe_valid primary" in log
    assert moved("callahead_dry_run_overrides_total", decision="reject") == 1
    assert moved("callahead_rcpt_decisions_total", decision="reject", reason="probe_unknown") == 1


def test_cache_show_and_flush_make_the_next_recipient_probe_again(
    stack: Stack, ops: CallaheadProcess, port: int
) -> None:
    user = stack.new_user("ops.test", stack.ops_primary)
    other = stack.new_user("ops.test", stack.ops_primary)
    assert seconds_left(ops, user) is None

    assert send(port, SENDER, [user, other]).code(user) == 250
    left = seconds_left(ops, user)
    assert left is not None and 86000 < left <= 86400
    assert send(port, SENDER, [user]).code(user) == 250
    assert stack.ops_primary.probes_for(user) == 1  # the second one was a cache hit

    flushed = ops.cli("cache", "flush", user)
    assert flushed.returncode == 0, flushed.stderr
    assert flushed.stdout.strip() == "flushed 1 entry"
    assert seconds_left(ops, user) is None
    assert seconds_left(ops, other) is not None  # only that address went
    assert send(port, SENDER, [user]).code(user) == 250
    assert stack.ops_primary.probes_for(user) == 2  # the primary saw it again

    by_domain = ops.cli("cache", "flush", "@OPS.test")
    assert by_domain.returncode == 0, by_domain.stderr
    assert by_domain.stdout.strip() == "flushed 2 entries"
    assert seconds_left(ops, other) is None
    stats = ops.cli("cache", "stats")
    assert stats.returncode == 0, stats.stderr
    assert "entries: 0" in stats.stdout.splitlines()
    assert ops.cli("cache", "flush", "--all").stdout.strip() == "flushed 0 entries"


def test_status_is_healthy_then_degraded_with_the_primary_stopped(
    stack: Stack, ops: CallaheadProcess, port: int
) -> None:
    user = stack.new_user("ops.test", stack.ops_primary)
    assert send(port, SENDER, [user]).code(user) == 250
    healthy = ops.cli("status")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.startswith("callahead: healthy\nprobe loop: alive")
    assert f"primary [127.0.0.1]:{stack.ops_primary.port}: breaker closed" in healthy.stdout
    assert "last probe valid" in healthy.stdout

    stack.ops_primary.stop()
    stranger = stack.new_address("ops.test")
    assert send(port, SENDER, [stranger]).code(stranger) == 250  # undecided: accepted
    degraded = ops.cli("status")
    assert degraded.returncode == 1, degraded.stdout + degraded.stderr
    assert degraded.stdout.startswith("callahead: degraded\n")
    assert "last probe tempfail" in degraded.stdout
    assert "DEGRADED: not reached by the last probe" in degraded.stdout


def test_a_restart_with_the_cache_file_answers_a_cached_address_without_a_probe(
    stack: Stack, ops: CallaheadProcess, port: int
) -> None:
    user = stack.new_user("ops.test", stack.ops_primary)
    assert send(port, SENDER, [user]).code(user) == 250
    assert stack.ops_primary.probes_for(user) == 1

    ops.stop()
    saved = json.loads(Path(ops.env["CALLAHEAD_CACHE_FILE"]).read_text())
    assert user in [address for address, _ in saved["entries"]]
    ops.start()

    assert send(port, SENDER, [user]).code(user) == 250
    assert stack.ops_primary.probes_for(user) == 1  # answered from the loaded cache
    log = ops.log()
    assert re.search(r"cache file \S+: \d+ live entr(y|ies) loaded", log), log
    assert f"rcpt=<{user}> decision=accept reason=cache_hit" in log
    left = seconds_left(ops, user)
    assert left is not None and left <= 86400


def test_a_flush_stays_flushed_after_serve_is_killed(
    stack: Stack, ops: CallaheadProcess, port: int
) -> None:
    """kill -9 right after `callahead cache flush` (a crash, or systemd's watchdog
    abort): the flushed entry must not come back from the cache file at the next start,
    which it did until the next periodic save (CALLAHEAD_CACHE_SAVE_INTERVAL, 300 s)."""
    flushed_user = stack.new_user("ops.test", stack.ops_primary)
    kept = stack.new_user("ops.test", stack.ops_primary)
    tx = send(port, SENDER, [flushed_user, kept])
    assert tx.code(flushed_user) == tx.code(kept) == 250
    ops.stop()  # saved at stop: both are in the file now
    saved = json.loads(Path(ops.env["CALLAHEAD_CACHE_FILE"]).read_text())
    assert {flushed_user, kept} <= {address for address, _ in saved["entries"]}
    ops.start()

    flushed = ops.cli("cache", "flush", flushed_user)
    assert flushed.returncode == 0, flushed.stderr
    assert flushed.stdout.strip() == "flushed 1 entry"
    assert flushed.stderr == ""  # saved
    assert ops.pid is not None
    os.kill(ops.pid, signal.SIGKILL)
    wait_for(ops.exited, 10.0, what="the killed serve gone")
    assert ops.returncode == -signal.SIGKILL
    ops.stop()
    ops.start()

    assert seconds_left(ops, flushed_user) is None
    assert seconds_left(ops, kept) is not None
    assert send(port, SENDER, [flushed_user]).code(flushed_user) == 250
    assert stack.ops_primary.probes_for(flushed_user) == 2  # probed again, not from the file


def test_a_corrupt_cache_file_is_logged_and_the_service_runs(
    stack: Stack, ops: CallaheadProcess, port: int
) -> None:
    ops.stop()
    path = ops.env["CALLAHEAD_CACHE_FILE"]
    Path(path).write_text('{"format": "callahead-cache", "version": 1, "entries": [["u1@ops.te')
    ops.start()

    assert not ops.exited()
    assert "is not valid JSON (truncated or corrupt)" in ops.log()
    user = stack.new_user("ops.test", stack.ops_primary)
    stranger = stack.new_address("ops.test")
    tx = send(port, SENDER, [user, stranger])
    assert tx.code(user) == 250
    assert tx.code(stranger) == 550
    assert stack.ops_primary.probes_for(user) == 1


def test_refresh_ahead_forgets_a_user_deleted_on_the_primary_and_keeps_the_others(
    stack: Stack,
) -> None:
    profile = stack.profiles["refresh"]
    process, port, primary = profile.process, profile.port, stack.ops_primary
    moved = MetricsDelta(process)
    deleted = stack.new_user("refresh.test", primary)
    kept = stack.new_user("refresh.test", primary)
    tx = send(port, SENDER, [deleted, kept])
    assert tx.code(deleted) == tx.code(kept) == 250
    primary.remove_user(deleted)

    # Into the last half of the TTL, where a hit is refreshed ahead.
    window = REFRESH_TTL * 0.5
    wait_for(
        lambda: (seconds_left(process, kept) or REFRESH_TTL) < window - 1,
        REFRESH_TTL,
        what="the refresh window",
    )
    tx = send(port, SENDER, [deleted, kept])
    assert tx.code(deleted) == tx.code(kept) == 250  # answered from the cache at once
    # kept may be asked once more: as the control that vouches for deleted's 5.1.1.
    wait_for(
        lambda: primary.probes_for(deleted) == 2 and primary.probes_for(kept) >= 2,
        10.0,
        what="the background refreshes at the primary",
    )
    wait_for(lambda: seconds_left(process, deleted) is None, 10.0, what="the deleted user gone")
    left = seconds_left(process, kept)
    assert left is not None and left > window  # trusted for a new TTL

    assert send(port, SENDER, [deleted]).code(deleted) == 550
    assert moved("callahead_cache_refreshes_total", outcome="unknown") == 1
    assert moved("callahead_cache_refreshes_total", outcome="valid") == 1
