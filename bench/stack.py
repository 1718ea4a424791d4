"""The benchmark's machine state: everything on 127.0.0.1, built from tests/harness.

* one real Postfix backup MX, built from ``deploy/postfix-main.cf`` like the integration
  tests, relaying ``a.test`` and ``b.test`` to smtp-sink, with four smtpd listeners in
  the same instance (master.cf ``-o`` overrides):

  1. ``plain``: no recipient check (``-o smtpd_milters=``), the ceiling;
  2. ``callahead``: callahead attached (the main.cf ``smtpd_milters``);
  3. ``verify``: Postfix's own verification as backup-MX howtos configure it:
     ``smtpd_recipient_restrictions = reject_unverified_recipient``,
     ``address_verify_negative_cache = no``, ``unverified_recipient_reject_code = 550``;
  4. ``verify-fill``: the same verification with ``address_verify_poll_count = 1`` and
     no error limits, only used to fill Postfix's verify cache before the warm runs;
  5. ``guard``: a second callahead with its per-client guard at the defaults (case 2
     runs with it switched off; see ``GUARD_OFF``);
  6. ``trivial``: a pymilter milter that only says CONTINUE (``bench.trivial_milter``);
  7. ``policy``: callahead's policy service (``check_policy_service``, the settings of
     ``deploy/postfix-policy-main.cf``), the same callahead process as case 2;
  8. ``nullpolicy``: an asyncio policy service that only says DUNNO
     (``bench.trivial_policy``), attached the same way;

* two real Postfix primaries that know their users (``virtual_mailbox_maps``): ``a.test``
  with ``in_flow_delay = 0s``, ``b.test`` with Postfix's default ``in_flow_delay = 1s``.
  Both callahead (``CALLAHEAD_ROUTES``) and Postfix's verification
  (``address_verify_transport_maps``) send their probes there; deliveries go to smtp-sink;
* callahead, twice (``python -m callahead serve``, via ``tests.harness.callahead_process``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.ports import free_port
from tests.harness.postfix import (
    Listener,
    PostfixInstance,
    backup_mx_main_cf,
    policy_listener,
    primary_main_cf,
    smtp_nexthop,
)

from .tools import SmtpSink, TrivialMilterProcess, TrivialPolicyProcess, pid_listening_on

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class PrimarySpec:
    key: str
    domain: str
    in_flow_delay: str
    label: str


PRIMARIES = (
    PrimarySpec("a", "a.test", "0s", "0s"),
    PrimarySpec("b", "b.test", "1s", "1s (default)"),
)


@dataclass(frozen=True)
class Case:
    number: int
    """Also tags the case's addresses."""
    key: str
    label: str
    title: str

    @property
    def name(self) -> str:
        return f"{self.label} {self.title}"


PLAIN = Case(1, "plain", "1", "plain Postfix")
CALLAHEAD = Case(2, "callahead", "2", "callahead")
VERIFY = Case(3, "verify", "3", "reject_unverified_recipient")
GUARD = Case(4, "guard", "2g", "callahead, default client guard")
"""callahead with its per-client guard at the defaults: only in the attack workload."""

TRIVIAL = Case(5, "trivial", "2t", "trivial pymilter milter")
"""A milter that only says CONTINUE (bench.trivial_milter): the floor of any pymilter
milter. Only in the warm workload."""

POLICY = Case(6, "policy", "2p", "callahead policy service")
"""callahead's policy front end (check_policy_service), the same process as case 2."""
NULL_POLICY = Case(7, "nullpolicy", "2pt", "do-nothing policy service")
"""An asyncio policy service that only says DUNNO (bench.trivial_policy): the floor of
any policy service. Only in the warm workload."""
CASES = (PLAIN, CALLAHEAD, POLICY, VERIFY)
"""The cases of every workload."""
FLOORS = {CALLAHEAD: TRIVIAL, POLICY: NULL_POLICY}
"""Each front end's do-nothing floor, measured in the same runs."""

GUARD_OFF = {"CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0"}
"""Case 2 runs with the per-client guard switched off: all load comes from 127.0.0.1,
and with the guard on, every unknown recipient after the 20th would get 450 4.7.1
without a probe (that is case 2g), and so would every uncached valid one after it."""


@dataclass
class Stack:
    workdir: Path
    sink: SmtpSink
    primaries: dict[str, PostfixInstance]
    """By domain."""
    callahead: CallaheadProcess
    callahead_pid: int
    guard: CallaheadProcess
    guard_pid: int
    backup: PostfixInstance
    ports: dict[str, int]
    """smtpd ports of the backup by case key, plus ``verify-fill``."""
    floor_pids: dict[str, int]
    """The do-nothing floors' pids by case key (``trivial``, ``nullpolicy``)."""

    def port(self, case: Case) -> int:
        return self.ports[case.key]

    def process(self, case: Case) -> tuple[CallaheadProcess, int]:
        """The callahead process (and its pid) behind a case; case 2's for cases 1 and 3
        and for the floors (2t, 2pt), which are not callahead (see ``cpu_pid``)."""
        if case.key == GUARD.key:
            return self.guard, self.guard_pid
        return self.callahead, self.callahead_pid

    def cpu_pid(self, case: Case) -> int:
        """The process whose CPU a case's run costs: the floor's own for 2t and 2pt, the
        callahead behind it otherwise (for cases 1 and 3 that is case 2's callahead,
        idle: what it spends in the background)."""
        return self.floor_pids.get(case.key, self.process(case)[1])

    def primary_port(self, domain: str) -> int:
        return self.primaries[domain].port

    def backup_queue_size(self) -> int:
        """Files in the backup's queues (maildrop, incoming, active, deferred, hold)."""
        total = 0
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.backup.queue_dir / name):
                total += len(files)
        return total


def supported(variables: Mapping[str, str]) -> dict[str, str]:
    """The ``variables`` that this callahead knows (``callahead --help`` lists them all;
    it refuses unknown ``CALLAHEAD_*`` names), so that the benchmark also runs against
    versions without them."""
    proc = subprocess.run(
        [sys.executable, "-m", "callahead", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return {key: value for key, value in variables.items() if key in proc.stdout}


def _inline(entries: Mapping[str, str]) -> str:
    return "inline:{" + ", ".join(f"{key}={value}" for key, value in entries.items()) + "}"


@contextlib.contextmanager
def build_stack(
    workdir: Path,
    users: Mapping[str, Sequence[str]],
    callahead_env: Mapping[str, str] | None = None,
    guard_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """Start everything; stop everything (in reverse order) when the block ends, on
    errors and on KeyboardInterrupt too. ``users``: valid addresses by primary domain;
    ``callahead_env``: extra ``CALLAHEAD_*`` settings for case 2's callahead;
    ``guard_env``: for the second callahead (case 2g's listener), which a driver may use
    as another variant of case 2."""
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(SmtpSink(workdir))

        primaries: dict[str, PostfixInstance] = {}
        for spec in PRIMARIES:
            pdir = workdir / f"primary-{spec.key}"
            pdir.mkdir(mode=0o755)
            main_cf = primary_main_cf(
                workdir=pdir,
                users=users.get(spec.domain, ()),
                domains=[spec.domain],
                hostname=f"primary-{spec.key}.test",
                in_flow_delay=spec.in_flow_delay,
            )
            instance = PostfixInstance(pdir, main_cf, [Listener(free_port())])
            primaries[spec.domain] = stack.enter_context(instance)

        routes = " ".join(
            f"{domain}=[127.0.0.1]:{instance.port}" for domain, instance in primaries.items()
        )
        # INFO: the production default (one log line per recipient).
        env = {"CALLAHEAD_ROUTES": routes, "CALLAHEAD_LOG_LEVEL": "INFO"}
        callahead = stack.enter_context(
            CallaheadProcess(
                workdir,
                {**env, **supported(GUARD_OFF), **(callahead_env or {})},
                name="callahead",
            )
        )
        guard = stack.enter_context(
            CallaheadProcess(workdir, {**env, **(guard_env or {})}, name="callahead-guard")
        )
        trivial = stack.enter_context(TrivialMilterProcess(workdir))
        null_policy = stack.enter_context(TrivialPolicyProcess(workdir))

        keys = (
            "plain",
            "callahead",
            "verify",
            "verify-fill",
            "guard",
            "trivial",
            "policy",
            "nullpolicy",
        )
        ports = {key: free_port() for key in keys}
        main_cf = backup_mx_main_cf(
            workdir=workdir / "backup",
            relay_domains=list(primaries),
            transports={domain: f"[127.0.0.1]:{sink.port}" for domain in primaries},
            milter=callahead.socket,
        )
        main_cf.update(
            {
                # Postfix's own verification probes go to the primaries, not to
                # transport_maps (smtp-sink answers 250 to everything).
                "address_verify_transport_maps": _inline(
                    {domain: smtp_nexthop(instance.port) for domain, instance in primaries.items()}
                ),
                "address_verify_negative_cache": "no",
                "unverified_recipient_reject_code": "550",
            }
        )
        verify = {
            "smtpd_milters": "",
            "smtpd_recipient_restrictions": "reject_unverified_recipient",
        }
        listeners = [
            Listener(ports["plain"], {"smtpd_milters": ""}),
            Listener(ports["callahead"]),
            Listener(ports["verify"], verify),
            Listener(
                ports["verify-fill"],
                {
                    **verify,
                    "address_verify_poll_count": "1",
                    "smtpd_soft_error_limit": "100000",
                    "smtpd_hard_error_limit": "100000",
                },
            ),
            Listener(ports["guard"], {"smtpd_milters": guard.socket}),
            Listener(ports["trivial"], {"smtpd_milters": trivial.socket}),
            policy_listener(ports["policy"], callahead.policy_service),
            policy_listener(ports["nullpolicy"], null_policy.service),
        ]
        backup = stack.enter_context(PostfixInstance(workdir / "backup", main_cf, listeners))
        callahead_pid = pid_listening_on(callahead.milter_port)
        if pid_listening_on(callahead.policy_port) != callahead_pid:
            # Cases 2 and 2p are charged the CPU of one pid: it must serve both.
            raise RuntimeError("callahead's milter and policy service are not one process")
        yield Stack(
            workdir=workdir,
            sink=sink,
            primaries=primaries,
            callahead=callahead,
            callahead_pid=callahead_pid,
            guard=guard,
            guard_pid=pid_listening_on(guard.milter_port),
            backup=backup,
            ports=ports,
            floor_pids={
                TRIVIAL.key: pid_listening_on(trivial.port),
                NULL_POLICY.key: pid_listening_on(null_policy.port),
            },
        )
