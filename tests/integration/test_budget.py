"""Catch-all detection and the probe budget, through real parts: a real Postfix backup
MX with callahead attached as its milter, and a real Postfix primary configured as
sites configure it.

The primary serves three domains: normal.test and budget.test through a virtual
mailbox map (unknown users get 550 5.1.1), and catchall.test as a virtual alias domain
whose ``@catchall.test`` entry in ``virtual_alias_maps`` takes every address (the usual
catch-all). It logs every RCPT TO it is asked (a ``check_recipient_access static:INFO``
restriction), so the tests count what the primary saw from its own log.

This module builds its own stack (not the session's ``stack`` fixture): one backup
listener per callahead profile, ``catchall`` (checks on, no budget) and ``budget``
(``CALLAHEAD_PRIMARY_RATE=2``, defer on undecided, checks off so that only the burst
takes tokens).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from callahead.caching.catchall import CHECK_PREFIX
from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import Transaction, send
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import (
    SNIPPET,
    Listener,
    PostfixInstance,
    backup_mx_main_cf,
    primary_main_cf,
)
from tests.harness.waiting import wait_for

SENDER = "sender@remote.test"
RATE = 2.0
"""CALLAHEAD_PRIMARY_RATE of the budget profile: a bucket of 2, then one every 0.5 s."""
BURST = 2.0
PROBE_WAIT = 1.0
BURST_CLIENTS = 10
BURST_RCPTS = 3
"""Each of BURST_CLIENTS concurrent clients sends this many new addresses in a row."""
BURST_USERS = [f"b{n}@budget.test" for n in range(BURST_CLIENTS * BURST_RCPTS)]
CATCHER = "catcher@normal.test"
DEFER_451 = "4.4.3"
GAUGE = "callahead_domain_accepts_all"
RCPT_SEEN = re.compile(r"info: RCPT from \S+: [^;]*; from=<[^>]*> to=<([^>]*)>")
"""The primary's log line for each RCPT TO it is asked (check_recipient_access
static:INFO); accepted or not, with the NOQUEUE or queue id prefix."""


@dataclass
class Rig:
    workdir: Path
    primary: PostfixInstance
    backup: PostfixInstance
    processes: dict[str, CallaheadProcess]
    ports: dict[str, int]
    """The backup listener whose milter is each profile's callahead."""

    def seen(self, address: str | None = None) -> list[str]:
        """Every address the primary was asked at RCPT TO (or only ``address``)."""
        found = RCPT_SEEN.findall(self.primary.maillog())
        return [a for a in found if address is None or a.lower() == address.lower()]

    def checks_seen(self, domain: str) -> list[str]:
        """The catch-all checks of ``domain`` the primary was asked, once there is one
        (postlogd writes the primary's log a moment after its smtpd answered)."""
        return wait_for(
            lambda: [
                a for a in self.seen() if a.startswith(CHECK_PREFIX) and a.endswith("@" + domain)
            ],
            10.0,
            what=f"a check of {domain} in the primary's log",
        )

    def sample(self, profile: str, name: str, **labels: str) -> float | None:
        key = (name, tuple(sorted(labels.items())))
        return self.processes[profile].samples().get(key)


def hop(port: int) -> str:
    return f"[127.0.0.1]:{port}"


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    if os.geteuid() != 0:
        pytest.skip("the integration tests run a real Postfix, whose master needs root")
    with make_workdir() as workdir, contextlib.ExitStack() as started:
        primary_dir = workdir / "primary"
        primary_dir.mkdir(mode=0o755)
        primary_cf = primary_main_cf(
            workdir=primary_dir,
            users=["u1@normal.test", CATCHER, *BURST_USERS],
            domains=["normal.test", "budget.test"],
            hostname="primary.test",
        )
        primary_cf.update(
            {
                "virtual_alias_domains": "catchall.test",
                "virtual_alias_maps": f"inline:{{@catchall.test={CATCHER}}}",
                "smtpd_recipient_restrictions": "check_recipient_access static:INFO",
            }
        )
        primary = started.enter_context(
            PostfixInstance(primary_dir, primary_cf, [Listener(free_port())])
        )
        to_primary = hop(primary.port)
        base = {"CALLAHEAD_PROBE_TIMEOUT": "5", "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0"}
        profiles = {
            "catchall": {
                **base,
                "CALLAHEAD_ROUTES": f"catchall.test={to_primary} normal.test={to_primary}",
                "CALLAHEAD_CATCHALL_CHECK": "3600",
            },
            "budget": {
                **base,
                "CALLAHEAD_ROUTES": f"budget.test={to_primary}",
                "CALLAHEAD_PRIMARY_RATE": f"{RATE:g}",
                "CALLAHEAD_PROBE_WAIT": f"{PROBE_WAIT:g}",
                "CALLAHEAD_TEMPFAIL_ACTION": "defer",
                "CALLAHEAD_CATCHALL_CHECK": "0",
            },
        }
        processes = {
            name: started.enter_context(CallaheadProcess(workdir, env, name=f"callahead-{name}"))
            for name, env in profiles.items()
        }
        ports = {name: free_port() for name in profiles}
        domains = ["catchall.test", "normal.test", "budget.test"]
        backup = started.enter_context(
            PostfixInstance(
                workdir / "backup",
                backup_mx_main_cf(
                    SNIPPET,
                    workdir=workdir / "backup",
                    relay_domains=domains,
                    transports=dict.fromkeys(domains, to_primary),
                    milter=None,
                ),
                [
                    Listener(ports[name], {"smtpd_milters": process.socket})
                    for name, process in processes.items()
                ],
            )
        )
        yield Rig(workdir, primary, backup, processes, ports)


def new(domain: str) -> str:
    return f"x{uuid.uuid4().hex[:12]}@{domain}"


# --- catch-all detection ------------------------------------------------------------------


def test_an_accept_all_primary_is_detected_and_its_recipients_are_not_probed(rig: Rig) -> None:
    first = new("catchall.test")
    tx = send(rig.ports["catchall"], SENDER, [first])
    assert tx.code(first) == 250
    # The first recipient started a check: a made-up address, which the primary takes.
    wait_for(
        lambda: rig.sample("catchall", GAUGE, domain="catchall.test") == 1.0,
        10.0,
        what="catchall.test to be found accepting all",
    )
    checks = wait_for(
        lambda: [
            a
            for a in rig.seen()
            if a.startswith("callahead-check-") and a.endswith("@catchall.test")
        ],
        10.0,
        what="the check in the primary's log",
    )
    assert len(checks) == 1
    log = rig.processes["catchall"].log
    assert log().count("domain catchall.test accepts all") == 1
    assert "cannot verify the recipients of catchall.test" in log()

    # From now on its recipients are accepted without a probe: the primary never sees them.
    later = [new("catchall.test") for _ in range(3)]
    tx = send(rig.ports["catchall"], SENDER, later)
    assert [tx.code(a) for a in later] == [250, 250, 250]
    wait_for(
        lambda: all(f"rcpt=<{a}> decision=accept reason=accepts_all" in log() for a in later),
        5.0,
        what="the decision lines",
    )
    for address in later:
        assert rig.seen(address) == []
    assert rig.seen(first) == [first]  # the first one was probed, before the check said so
    assert rig.sample("catchall", "callahead_catchall_checks_total", outcome="valid") == 1.0


def test_a_normal_primary_is_not_flagged_and_unknown_users_are_still_refused(rig: Rig) -> None:
    tx = send(rig.ports["catchall"], SENDER, ["u1@normal.test"])
    assert tx.code("u1@normal.test") == 250
    wait_for(
        lambda: rig.sample("catchall", GAUGE, domain="normal.test") == 0.0,
        10.0,
        what="normal.test to be found rejecting made-up addresses",
    )
    assert rig.sample("catchall", "callahead_catchall_checks_total", outcome="unknown") == 1.0
    assert len(rig.checks_seen("normal.test")) == 1
    ghost = new("normal.test")
    tx = send(rig.ports["catchall"], SENDER, [ghost])
    assert tx.code(ghost) == 550
    # Probed, as every recipient of a normal domain (postlogd writes a moment later).
    wait_for(lambda: rig.seen(ghost) == [ghost], 10.0, what="the probe in the primary's log")
    assert "domain normal.test accepts all" not in rig.processes["catchall"].log()


# --- the probe budget ----------------------------------------------------------------------


def test_a_burst_over_the_rate_waits_then_gets_the_tempfail_action(rig: Rig) -> None:
    """Ten clients at once, each with three new addresses in a row: the primary is asked
    no more than the bucket's burst plus the rate over the whole burst, some recipients
    wait for a token, and every one over the budget gets the tempfail action (here 451;
    never a 550)."""
    batches = [BURST_USERS[n * BURST_RCPTS : (n + 1) * BURST_RCPTS] for n in range(BURST_CLIENTS)]
    started = time.monotonic()
    with ThreadPoolExecutor(BURST_CLIENTS) as pool:
        transactions: list[Transaction] = list(
            pool.map(lambda rcpts: send(rig.ports["budget"], SENDER, rcpts), batches)
        )
    elapsed = time.monotonic() - started

    codes = {a: tx.code(a) for tx in transactions for a in tx.rcpt}
    seconds = {a: tx.rcpt_seconds[a] for tx in transactions for a in tx.rcpt}
    texts = {a: tx.rcpt[a][1] for tx in transactions for a in tx.rcpt}
    accepted = sorted(a for a, code in codes.items() if code == 250)
    deferred = sorted(a for a, code in codes.items() if code == 451)
    assert len(codes) == len(BURST_USERS)
    assert sorted(accepted + deferred) == sorted(BURST_USERS)  # nothing else, no 550
    assert all(DEFER_451 in texts[a] for a in deferred)

    # The primary's own count: exactly the accepted ones (once postlogd has written
    # them), within the budget.
    def probed() -> list[str]:
        return sorted(a for a in rig.seen() if a.endswith("@budget.test"))

    wait_for(lambda: probed() == accepted, 10.0, what="the accepted probes in the primary's log")
    assert len(probed()) <= BURST + RATE * elapsed
    assert len(deferred) >= len(BURST_USERS) - (BURST + RATE * elapsed)
    # Some were probed only after waiting for their token (the bucket was empty).
    assert any(seconds[a] >= 0.4 for a in accepted)
    # Over-budget ones are refused at once when their token would come after
    # CALLAHEAD_PROBE_WAIT, never held longer than it.
    assert all(seconds[a] < PROBE_WAIT + 0.5 for a in deferred)
    decisions = rig.sample(
        "budget", "callahead_rcpt_decisions_total", decision="defer", reason="primary_budget"
    )
    assert decisions == len(deferred)
