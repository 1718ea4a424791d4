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
* A *strict* real Postfix primary configured as sites configure it (``hash:`` mailbox
  map, default ``smtpd_delay_reject = yes``), with one listener per restriction that
  refuses the prober rather than the recipient: ``reject_non_fqdn_helo_hostname``
  (helo.strict.test), ``check_sender_access`` refusing ``<>`` (sender.strict.test),
  ``check_client_access`` refusing the backup's address (client.strict.test); one with
  ``reject_multi_recipient_bounce`` first in ``smtpd_recipient_restrictions``, as
  hardening guides set it (mrb.strict.test); and a plain listener that the backup
  delivers every strict domain to. Like many real sites (database-backed virtual
  domains), the strict primary has no postmaster@ mailbox in any domain. A scripted
  primary answers as Microsoft 365 does (m365.test), postmaster@ included. Peers'
  MTAs as primaries: a real Exim 4 (exim.test) and a real OpenSMTPD (opensmtpd.test),
  from Debian's packages unpacked by tests/harness/peers.py.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess, Samples
from tests.harness.fixtures import make_workdir
from tests.harness.peers import EXIM_RATE_LIMIT_ACL, PRIMARIES, EximPrimary, PeerPrimary
from tests.harness.ports import free_port
from tests.harness.postfix import (
    Listener,
    PostfixInstance,
    backup_mx_main_cf,
    policy_listener,
    primary_main_cf,
)
from tests.harness.primary import Primary, SilentServer
from tests.harness.scripted import Script, ScriptedServer
from tests.harness.threaded import ThreadedServer

REPO = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT = 2.0
SENDER = "sender@remote.test"
REFRESH_TTL = 6.0
"""CALLAHEAD_CACHE_TTL of the refresh profile, whose last half is refreshed ahead."""
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
    "disconnect": Script(hang_up_at="RCPT"),
    "slow": Script(delay={"RCPT": PROBE_TIMEOUT + 1.5}),
    "tlsbroken": Script(extensions=("PIPELINING", "STARTTLS"), tls="broken"),
    "tlsok": Script(extensions=("PIPELINING", "STARTTLS"), tls="ok", rcpt_default="250 2.1.5 Ok"),
    # Replies no SMTP client can read: not a verdict, a fault of the primary.
    "garbage": Script(rcpt_default="xyz what"),
    "oversized": Script(rcpt_default="550 5.1.1 " + "x" * 40_000),
}
STRICT_KINDS = {
    # domain label -> the listener's restriction, delayed to RCPT TO by Postfix's default
    "helo": {"smtpd_helo_restrictions": "reject_non_fqdn_helo_hostname"},
    "sender": {"smtpd_sender_restrictions": "check_sender_access inline:{<>=REJECT}"},
    "client": {"smtpd_client_restrictions": "check_client_access inline:{127.0.0.1=REJECT}"},
    "mrb": {"smtpd_recipient_restrictions": "reject_multi_recipient_bounce"},
}
STRICT_DOMAINS = ("helo", "sender", "client", "mrb", "nopm", "late", "ttl", "drift")
"""Domains of the strict primary, NAME.strict.test; none has postmaster@."""
MRB_USERS = 10
"""Users u1 ... u10 of mrb.strict.test."""
FALLBACK_SENDER = "probe@backup.test"
M365_UNKNOWN = "550 5.4.1 Recipient address rejected: Access denied. AS(201806281)"
M365_OVERRIDES = {
    "policy@m365.test": "550 5.7.606 Access denied, banned sending IP [127.0.0.1]",
    "throttled@m365.test": "452 4.5.3 Too many recipients",
    "busy@m365.test": "451 4.7.500 Server busy. Please try again later from [127.0.0.1]",
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


FRONT_ENDS = ("milter", "policy")


@dataclass
class Profile:
    """One callahead process and the backup listeners attached to it."""

    process: CallaheadProcess
    port: int
    """The backup MX's smtpd port whose milter is this callahead."""
    policy_port: int
    """The backup MX's smtpd port that asks this callahead's policy service
    (deploy/postfix-policy-main.cf)."""

    def port_for(self, front_end: str) -> int:
        """The backup listener that reaches this callahead through ``front_end``."""
        return {"milter": self.port, "policy": self.policy_port}[front_end]


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
    strict: PostfixInstance
    """The strict real Postfix primary (see STRICT_KINDS)."""
    strict_ports: dict[str, int]
    """Its listeners: one per STRICT_KINDS entry, and "deliver" (no restriction)."""
    strict_users: list[str]
    """Its mailboxes (no postmaster@): pass a changed copy to set_strict_users."""
    m365: ScriptedServer
    peers: dict[str, PeerPrimary]
    """Peers' MTAs as primaries, each with u1@ (eximrl u1 to u3) and no postmaster@: "exim"
    (Exim 4, Debian's shipped configuration) for exim.test, "opensmtpd" for
    opensmtpd.test, and "eximrl" for eximrl.test, an Exim whose RCPT ACL refuses the
    prober's address with a rate limit after it accepted postmaster@ (the backup
    delivers eximrl.test to the stand-in)."""
    held: ScriptedServer
    """The shutdown profile's primary (held.test): answers RCPT after 15 s."""
    ops_primary: Primary
    no_policy_port: int
    """A backup listener whose policy service (callahead) is not running."""
    """The primary of the ops and refresh profiles (ops.test, refresh.test), which
    test_operations.py stops and starts."""
    profiles: dict[str, Profile] = field(default_factory=dict)

    def set_strict_users(self, users: list[str]) -> None:
        """Change the strict primary's users as an administrator does: edit the map
        source, postmap, postfix reload."""
        self.strict_users = list(users)
        self.strict.set_virtual_users(self.strict_users)

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
        started: list[ThreadedServer | CallaheadProcess | PeerPrimary] = []
        instances: list[PostfixInstance] = []
        try:
            primary = Primary([], hostname="primary.test")
            null_primary = Primary([], hostname="nullsender-primary.test", reject_null_sender=True)
            silent = SilentServer()
            faults = {name: ScriptedServer(script) for name, script in FAULTS.items()}
            blackhole = ScriptedServer(Script(banner=None))
            stall = ScriptedServer(Script(delay={"RCPT": 4.0}, rcpt_default="250 2.1.5 Ok"))
            slow = ScriptedServer(Script(delay={"RCPT": 0.5}))
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

            strict_dir = workdir / "strict-primary"
            strict_dir.mkdir(mode=0o755)
            strict_domains = [f"{d}.strict.test" for d in STRICT_DOMAINS]
            strict_users = [f"u1@{d}" for d in strict_domains] + [
                f"u{n}@mrb.strict.test" for n in range(2, MRB_USERS + 1)
            ]
            strict_ports = {kind: free_port() for kind in (*STRICT_KINDS, "deliver")}
            strict = PostfixInstance(
                strict_dir,
                primary_main_cf(
                    workdir=strict_dir,
                    users=strict_users,
                    domains=strict_domains,
                    hostname="strict-primary.test",
                    map_type="hash",
                ),
                [Listener(port, STRICT_KINDS.get(kind, {})) for kind, port in strict_ports.items()],
            )
            strict.start()
            instances.append(strict)
            m365 = ScriptedServer(
                Script(
                    banner="220 m365.test Microsoft ESMTP MAIL Service ready",
                    rcpt_default=M365_UNKNOWN,
                    rcpt_overrides=dict(M365_OVERRIDES),
                    users=frozenset({"known@m365.test", "known2@m365.test"}),
                )
            )
            m365.start()
            started.append(m365)
            held = ScriptedServer(Script(delay={"RCPT": 15.0}, rcpt_default="250 2.1.5 Ok"))
            held.start()
            started.append(held)
            ops_primary = Primary([], hostname="ops-primary.test")
            ops_primary.start()
            started.append(ops_primary)
            peers: dict[str, PeerPrimary] = {}
            for peer_name, kind in PRIMARIES.items():
                peer_dir = workdir / f"{peer_name}-primary"
                peer_dir.mkdir(mode=0o755)
                peer = kind(peer_dir, domain=f"{peer_name}.test", users=["u1"])
                peer.start()
                started.append(peer)
                peers[peer_name] = peer
            # Debian's Exim with a rate limit on the prober's address after the
            # postmaster@ accept (its CHECK_RCPT_LOCAL_ACL_FILE hook): known users get a
            # bare "550 Sender rate overlimit" on a session that accepted postmaster@.
            limited_dir = workdir / "eximrl-primary"
            limited_dir.mkdir(mode=0o755)
            limited = EximPrimary(
                limited_dir,
                domain="eximrl.test",
                users=["u1", "u2", "u3"],
                rcpt_acl_extra=EXIM_RATE_LIMIT_ACL,
            )
            limited.start()
            started.append(limited)
            peers["eximrl"] = limited

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
                # Checks are background probes these tests would count (connections,
                # breaker failures, RCPTs); test_budget.py tests them.
                "CALLAHEAD_CATCHALL_CHECK": "0",
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
            strict_hop = hop(strict_ports["deliver"])
            strict_routes = (
                " ".join(f"{kind}.strict.test={hop(strict_ports[kind])}" for kind in STRICT_KINDS)
                + f" nopm.strict.test={strict_hop} late.strict.test={strict_hop}"
                + f" drift.strict.test={strict_hop}"
                + f" m365.test={hop(m365.port)}"
            )
            settings["strict"] = (
                # The non-FQDN HELO that socket.getfqdn() gives on many hosts.
                {**base, "CALLAHEAD_ROUTES": strict_routes, "CALLAHEAD_HELO_NAME": "localhost"},
                RAISED_LIMITS,
            )
            settings["peers"] = (
                {
                    **base,
                    "CALLAHEAD_ROUTES": " ".join(
                        f"{name}.test={hop(peer.port)}" for name, peer in peers.items()
                    ),
                },
                {},
            )
            settings["shutdown"] = (
                # Stopped by test_lifecycle.py: used by no other test.
                {
                    **base,
                    "CALLAHEAD_ROUTES": f"held.test={hop(held.port)}",
                    # Longer than libmilter's wind-down: the probe is still in flight.
                    "CALLAHEAD_PROBE_TIMEOUT": "20",
                },
                {},
            )
            settings["strict_ttl1"] = (
                {
                    **base,
                    "CALLAHEAD_ROUTES": f"ttl.strict.test={strict_hop}",
                    "CALLAHEAD_CACHE_TTL": "1",
                },
                {},
            )
            settings["fallback"] = (
                {
                    **base,
                    "CALLAHEAD_ROUTES": f"sender.strict.test={hop(strict_ports['sender'])}",
                    "CALLAHEAD_PROBE_FALLBACK_SENDER": FALLBACK_SENDER,
                },
                {},
            )
            settings["dryrun"] = (
                {**base, "CALLAHEAD_ROUTES": main_routes, "CALLAHEAD_DRY_RUN": "yes"},
                {},
            )
            settings["ops"] = (
                # test_operations.py restarts it and stops its primary.
                {
                    **base,
                    "CALLAHEAD_ROUTES": f"ops.test={hop(ops_primary.port)}",
                    "CALLAHEAD_CACHE_FILE": str(workdir / "ops-cache.json"),
                    "CALLAHEAD_PROBE_TIMEOUT": "1",
                },
                {},
            )
            settings["refresh"] = (
                {
                    **base,
                    "CALLAHEAD_ROUTES": f"refresh.test={hop(ops_primary.port)}",
                    "CALLAHEAD_CACHE_TTL": str(REFRESH_TTL),
                    "CALLAHEAD_CACHE_REFRESH": "0.5",
                },
                {},
            )
            profiles: dict[str, Profile] = {}
            for name, (env, _) in settings.items():
                process = CallaheadProcess(workdir, env, name=f"callahead-{name}")
                process.start()
                started.append(process)
                profiles[name] = Profile(process, free_port(), free_port())

            deliver_to_primary = [
                "example.test",
                "hang.test",
                "unrouted.test",
                "failover.test",
                "pf.test",
                "blackhole.test",
                "stall.test",
                "slow.test",
                "held.test",
                "refused.fault.test",
                *(f"{name}.fault.test" for name in FAULTS),
            ]
            transports = {
                domain: hop(primary.port) for domain in [*deliver_to_primary, "m365.test"]
            }
            transports["nullsender.test"] = hop(null_primary.port)
            transports["ops.test"] = transports["refresh.test"] = hop(ops_primary.port)
            transports.update({domain: strict_hop for domain in strict_domains})
            transports.update({f"{name}.test": hop(peer.port) for name, peer in peers.items()})
            # The rate limit would refuse the backup's own delivery too.
            transports["eximrl.test"] = hop(primary.port)
            no_policy_port = free_port()
            main_cf = backup_mx_main_cf(
                workdir=workdir / "backup",
                relay_domains=list(transports),
                transports=transports,
                milter=profiles["main"].process.socket,
            )
            backup = PostfixInstance(
                workdir / "backup",
                main_cf,
                [
                    *(
                        Listener(
                            profile.port,
                            {**settings[name][1], "smtpd_milters": profile.process.socket},
                        )
                        for name, profile in profiles.items()
                    ),
                    policy_listener(no_policy_port, f"inet:127.0.0.1:{refused_port}"),
                    *(
                        policy_listener(
                            profile.policy_port, profile.process.policy_service, settings[name][1]
                        )
                        for name, profile in profiles.items()
                    ),
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
                strict,
                strict_ports,
                strict_users,
                m365,
                peers,
                held,
                ops_primary,
                no_policy_port,
                profiles,
            )
        finally:
            for instance in reversed(instances):
                instance.stop()
            # Each callahead takes up to ~5 s to wind down after SIGTERM (libmilter's
            # listener): stop them side by side, then the servers.
            with ThreadPoolExecutor(len(started) or 1) as pool:
                list(
                    pool.map(
                        lambda p: p.stop(), [t for t in started if isinstance(t, CallaheadProcess)]
                    )
                )
            for thing in reversed(started):
                if not isinstance(thing, CallaheadProcess):
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


@pytest.fixture(params=FRONT_ENDS)
def front_end(request: pytest.FixtureRequest) -> str:
    """Run the test through the milter, then through the policy service."""
    name: str = request.param
    return name


@pytest.fixture
def delta(stack: Stack) -> MetricsDelta:
    return MetricsDelta(stack.callahead)


ONE_USER = "known@example.test"
"""The one user of ``known_primary``."""


@pytest.fixture
def known_primary() -> Iterator[Primary]:
    """A stand-in primary that knows ``ONE_USER`` alone, stopped after the test."""
    server = Primary([ONE_USER], hostname="primary.test")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh 0755 work dir (``make_workdir``), removed after the test."""
    with make_workdir() as path:
        yield path
