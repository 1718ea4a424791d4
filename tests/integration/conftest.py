"""One real stack for the integration tests, started once per session.

* A real Postfix backup MX (Debian's package, a throwaway instance) configured from
  ``deploy/postfix-main.cf``, with one smtpd listener per callahead *profile* (each a
  real ``callahead serve`` process with its own settings, attached with
  ``-o smtpd_milters=``).
* Primaries: a stand-in that knows its users and stores what it receives
  (example.test, and the delivery target of every test domain), one that refuses the
  null sender (nullsender.test), a black hole that accepts TCP and never greets
  (hang.test), a real Postfix primary with its default error limits and inflow delay
  (pf.test), and one scripted server per fault of the fault matrix
  (NAME.fault.test). callahead probes the faulty servers while Postfix delivers the
  mail it accepts to the stand-in, so a test can check that nothing accepted is lost.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess, Samples
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import (
    Listener,
    PostfixInstance,
    backup_mx_main_cf,
    primary_main_cf,
)
from tests.harness.primary import Primary, SilentServer, _ThreadedServer
from tests.harness.scripted import Script, ScriptedServer

REPO = Path(__file__).resolve().parents[2]
SNIPPET = REPO / "deploy" / "postfix-main.cf"
PROBE_TIMEOUT = 2.0
SENDER = "sender@remote.test"
PF_USERS = 600
"""Virtual users of the real Postfix primary: pf0@pf.test ... pf599@pf.test."""

BANNER = "220 fault.test ESMTP"
FAULTS: dict[str, Script] = {
    "silent": Script(banner=None),
    "banner421": Script(banner="421 4.3.2 Service shutting down"),
    "banner554": Script(banner="554 5.7.1 No SMTP service here"),
    "ehlo5xx": Script(ehlo="500 5.5.1 Command unrecognized", helo="501 5.5.2 No HELO either"),
    "mail5xx": Script(mail="553 5.7.1 <>: Sender address rejected: null sender refused"),
    "rcpt450": Script(rcpt_default="450 4.2.0 Mailbox busy"),
    "rcpt451": Script(rcpt_default="451 4.3.0 Local error in processing"),
    "rcpt452": Script(rcpt_default="452 4.2.2 Insufficient system storage"),
    "rcpt550": Script(rcpt_default="550 5.1.1 No such user"),
    "rcpt551": Script(rcpt_default="551 5.1.6 User not local"),
    "rcpt553": Script(rcpt_default="553 5.1.3 Mailbox name not allowed"),
    "disconnect": Script(disconnect_after_rcpt=True),
    "slow": Script(rcpt_delay=PROBE_TIMEOUT + 1.5),
    "tlsbroken": Script(extensions=("PIPELINING", "STARTTLS"), tls="broken"),
    "tlsok": Script(extensions=("PIPELINING", "STARTTLS"), tls="ok", rcpt_default="250 2.1.5 Ok"),
}
RAISED_LIMITS = {
    # The backup's own error counters would slow a test client that sends many rejected
    # RCPTs in one session; these listeners measure callahead, not the backup's limits.
    "smtpd_soft_error_limit": "10000",
    "smtpd_hard_error_limit": "10000",
    "smtpd_junk_command_limit": "10000",
    "smtpd_recipient_limit": "10000",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@dataclass
class Profile:
    """One callahead process and the backup listener attached to it."""

    process: CallaheadProcess
    port: int
    """The backup MX's smtpd port whose milter is this callahead."""


@dataclass
class Stack:
    workdir: Path
    primary: Primary
    null_primary: Primary
    silent: SilentServer
    pf_primary: PostfixInstance
    faults: dict[str, ScriptedServer]
    refused_port: int
    """A port where nothing listens."""
    blackhole: ScriptedServer
    """The breaker profile's primary: silent until a test makes it answer."""
    stall: ScriptedServer
    """The overload profile's primary: answers RCPT after a long delay."""
    slow: ScriptedServer
    """The coalescing profile's primary: answers RCPT 550 after 0.5 s."""
    backup: PostfixInstance
    profiles: dict[str, Profile] = field(default_factory=dict)

    @property
    def callahead(self) -> CallaheadProcess:
        return self.profiles["main"].process

    @property
    def port(self) -> int:
        return self.profiles["main"].port

    @property
    def callahead_ttl1(self) -> CallaheadProcess:
        return self.profiles["ttl1"].process

    @property
    def port_ttl1(self) -> int:
        return self.profiles["ttl1"].port

    def new_user(self, domain: str = "example.test", primary: Primary | None = None) -> str:
        """A fresh address that the primary knows (fresh: never cached by callahead)."""
        addr = self.new_address(domain)
        (primary or self.primary).add_user(addr)
        return addr

    @staticmethod
    def new_address(domain: str = "example.test") -> str:
        return f"u{uuid.uuid4().hex[:12]}@{domain}"


def hop(port: int) -> str:
    return f"[127.0.0.1]:{port}"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    if os.geteuid() != 0:
        pytest.skip("the integration tests run a real Postfix, whose master needs root")
    with make_workdir() as workdir:
        started: list[_ThreadedServer | CallaheadProcess] = []
        instances: list[PostfixInstance] = []
        try:
            primary = Primary([], hostname="primary.test")
            null_primary = Primary([], hostname="nullsender-primary.test", reject_null_sender=True)
            silent = SilentServer()
            faults = {name: ScriptedServer(script) for name, script in FAULTS.items()}
            blackhole = ScriptedServer(Script(banner=None))
            stall = ScriptedServer(Script(rcpt_delay=4.0, rcpt_default="250 2.1.5 Ok"))
            slow = ScriptedServer(Script(rcpt_delay=0.5))
            for server in (primary, null_primary, silent, blackhole, stall, slow, *faults.values()):
                server.start()
                started.append(server)
            pf_dir = workdir / "pf-primary"
            pf_dir.mkdir(mode=0o755)
            pf_port = free_port()
            pf_primary = PostfixInstance(
                pf_dir,
                primary_main_cf(
                    workdir=pf_dir,
                    users=[f"pf{i}@pf.test" for i in range(PF_USERS)],
                    hostname="pf-primary.test",
                    in_flow_delay="1s",  # Postfix's default: the throttle is part of the test
                ),
                [Listener(pf_port)],
            )
            pf_primary.start()
            instances.append(pf_primary)

            refused_port = free_port()
            fault_routes = " ".join(
                f"{name}.fault.test={hop(server.port)}" for name, server in faults.items()
            )
            main_routes = (
                f"example.test={hop(primary.port)} hang.test={hop(silent.port)} "
                f"nullsender.test={hop(null_primary.port)} {fault_routes} "
                f"failover.test={hop(refused_port)} failover.test={hop(primary.port)} "
                f"refused.fault.test={hop(refused_port)}"
            )
            base = {
                "CALLAHEAD_PROBE_TIMEOUT": str(PROBE_TIMEOUT),
                "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
            }
            settings: dict[str, tuple[dict[str, str], dict[str, str]]] = {
                # name: (callahead environment, backup listener overrides)
                "main": ({**base, "CALLAHEAD_ROUTES": main_routes}, {}),
                "ttl1": (
                    {**base, "CALLAHEAD_ROUTES": main_routes, "CALLAHEAD_CACHE_TTL": "1"},
                    {},
                ),
                "defer": (
                    {**base, "CALLAHEAD_ROUTES": main_routes, "CALLAHEAD_TEMPFAIL_ACTION": "defer"},
                    {},
                ),
                "pf": (
                    {
                        **base,
                        "CALLAHEAD_ROUTES": f"pf.test={hop(pf_port)}",
                        "CALLAHEAD_PROBE_TIMEOUT": "10",
                    },
                    RAISED_LIMITS,
                ),
                "guard": (
                    {
                        **base,
                        "CALLAHEAD_ROUTES": f"example.test={hop(primary.port)}",
                        "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "5",
                        "CALLAHEAD_CLIENT_WINDOW": "600",
                    },
                    RAISED_LIMITS,
                ),
                "breaker": (
                    {
                        **base,
                        "CALLAHEAD_ROUTES": f"blackhole.test={hop(blackhole.port)}",
                        "CALLAHEAD_PROBE_TIMEOUT": "1",
                        "CALLAHEAD_BREAKER_FAILURES": "3",
                        "CALLAHEAD_BREAKER_COOLDOWN": "3",
                    },
                    RAISED_LIMITS,
                ),
                "overload": (
                    {
                        **base,
                        "CALLAHEAD_ROUTES": f"stall.test={hop(stall.port)}",
                        "CALLAHEAD_PROBE_TIMEOUT": "6",
                        "CALLAHEAD_MAX_PROBES": "2",
                        "CALLAHEAD_PROBE_WAIT": "0.3",
                    },
                    {},
                ),
                "coalesce": (
                    {
                        **base,
                        "CALLAHEAD_ROUTES": f"slow.test={hop(slow.port)}",
                        "CALLAHEAD_PROBE_TIMEOUT": "8",
                    },
                    RAISED_LIMITS,
                ),
            }
            profiles: dict[str, Profile] = {}
            for name, (env, _) in settings.items():
                process = CallaheadProcess(workdir, env, name=f"callahead-{name}")
                process.start()
                started.append(process)
                profiles[name] = Profile(process, free_port())

            deliver_to_primary = [
                "example.test",
                "hang.test",
                "unrouted.test",
                "failover.test",
                "pf.test",
                "blackhole.test",
                "stall.test",
                "slow.test",
                "refused.fault.test",
                *(f"{name}.fault.test" for name in FAULTS),
            ]
            transports = {domain: hop(primary.port) for domain in deliver_to_primary}
            transports["nullsender.test"] = hop(null_primary.port)
            main_cf = backup_mx_main_cf(
                SNIPPET,
                workdir=workdir / "backup",
                relay_domains=list(transports),
                transports=transports,
                milter=profiles["main"].process.socket,
            )
            backup = PostfixInstance(
                workdir / "backup",
                main_cf,
                [
                    Listener(
                        profile.port,
                        {**settings[name][1], "smtpd_milters": profile.process.socket},
                    )
                    for name, profile in profiles.items()
                ],
            )
            backup.start()
            instances.append(backup)
            yield Stack(
                workdir,
                primary,
                null_primary,
                silent,
                pf_primary,
                faults,
                refused_port,
                blackhole,
                stall,
                slow,
                backup,
                profiles,
            )
        finally:
            for instance in reversed(instances):
                instance.stop()
            for thing in reversed(started):
                thing.stop()


class MetricsDelta:
    """How far each counter of one callahead moved since this object was made."""

    def __init__(self, process: CallaheadProcess) -> None:
        self._process = process
        self._before: Samples = process.samples()

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        after = self._process.samples()
        return after.get(key, 0.0) - self._before.get(key, 0.0)


@pytest.fixture
def delta(stack: Stack) -> MetricsDelta:
    return MetricsDelta(stack.callahead)
