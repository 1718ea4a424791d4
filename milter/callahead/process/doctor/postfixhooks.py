"""``callahead doctor``, the Postfix side: each finding (an item, passed or not, with
its fix), and the checks of the backup's Postfix. This module reads the backup's
main.cf and master.cf (postfixview.py) and judges what smtpd will do: whether a service
attaches callahead at an address where it listens and where the ``postfix`` user can
connect (chroot and permissions included), who else can reach callahead there (a TCP
port: every local user), whether the default actions keep mail flowing when callahead
is unwell, whether Postfix waits long enough for an answer, whether the milter gets the
macros it needs, and whether the policy check comes after the relay check. checkup.py
runs them with the primary side (probes.py).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ...routing.postfixsettings import split_list
from ..config import Config
from ..endpoints import Listen, parse_listen
from ..postfixconf import postfix_seconds
from ..socketaccess import Account, account, inet_reach, local_exposure, unix_reach
from ..startchecks import answer_time_problem, tcp_exposure
from .postfixview import Hook, PostfixView, Service

POLICY_TIMEOUT_DEFAULT = "100s"
"""Postfix's default smtpd_policy_service_timeout."""
RCPT_MACROS = ("i", "{client_addr}")
MX_FACING = ("smtp",)


@dataclass(frozen=True)
class Finding:
    """One checked item: ``ok`` True (passes), False (fails), None (does not apply);
    ``warn``: it passes, mail is verified, but with a risk the operator chose or should
    know of (printed ``warn`` with its fix; the exit status stays 0)."""

    item: str
    ok: bool | None
    what: str
    fix: str = ""
    warn: bool = False

    def lines(self) -> list[str]:
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[self.ok]
        if self.warn and self.ok is not False:
            mark = "warn"
        out = [f"{mark} {self.item}: {self.what}"]
        if self.fix and (self.ok is False or self.warn):
            out.append(f"     fix: {self.fix}")
        return out


@dataclass(frozen=True)
class Attached:
    """A hook of one smtpd service that reaches callahead."""

    service: Service
    hook: Hook


def split_inet(address: str) -> tuple[str, int] | None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return set()


def same_inet(listen: Listen, host: str, port: int) -> bool:
    if port != listen.port:
        return False
    if listen.host in ("", "0.0.0.0", "::") or host == listen.host:
        return True
    return bool(_addresses(host) & _addresses(listen.host))


def _listens(config: Config) -> list[tuple[str, str, Listen]]:
    """(kind, variable, listener) of each front end callahead runs."""
    out: list[tuple[str, str, Listen]] = []
    if config.socket:
        out.append(("milter", "CALLAHEAD_SOCKET", parse_listen("CALLAHEAD_SOCKET", config.socket)))
    if config.policy_listen is not None:
        out.append(("policy", "CALLAHEAD_POLICY_LISTEN", config.policy_listen))
    return out


def postfix_name(view: PostfixView, listen: Listen) -> str:
    """How main.cf should name ``listen``."""
    if listen.kind == "inet":
        host = f"[{listen.host}]" if ":" in listen.host else listen.host
        return f"inet:{host}:{listen.port}"
    queue = view.queue_directory.rstrip("/") + "/"
    path = listen.path[len(queue) :] if listen.path.startswith(queue) else listen.path
    return f"unix:{path}"


def check_hooks(
    config: Config, view: PostfixView, who: Account | None
) -> tuple[list[Finding], list[Attached]]:
    """The ``hook`` item: which smtpd services attach callahead, and can they reach it."""
    findings: list[Finding] = []
    attached: list[Attached] = []
    listens = _listens(config)
    for service in view.services:
        hooks = view.milters(service) + view.policies(service)
        mine = False
        for hook in hooks:
            for kind, variable, listen in listens:
                if hook.kind != kind or hook.family != listen.kind:
                    continue
                finding = _check_hook(view, service, hook, variable, listen, who)
                if finding is None:
                    continue
                mine = True
                findings.append(finding)
                if finding.ok:
                    attached.append(Attached(service, hook))
        if not mine and (service.kind == "pass" or service.name in MX_FACING):
            wanted = " or ".join(
                f"{'smtpd_milters =' if k == 'milter' else 'check_policy_service'} "
                f"{postfix_name(view, listen)}"
                for k, _, listen in listens
            )
            findings.append(
                Finding(
                    "hook",
                    False,
                    f"{service} (the MX's smtpd) does not attach callahead: mail there is "
                    "never verified",
                    f"add {wanted} to main.cf (or to its -o overrides in master.cf)",
                )
            )
    if not findings:
        names = ", ".join(
            f"{variable}={postfix_name(view, listen)}" for _, variable, listen in listens
        )
        findings.append(
            Finding(
                "hook",
                False,
                f"no smtpd service in {view.config_dir} attaches callahead ({names})",
                "put callahead's address in smtpd_milters, or check_policy_service after "
                "reject_unauth_destination in smtpd_recipient_restrictions",
            )
        )
    return findings, attached


def _check_hook(
    view: PostfixView,
    service: Service,
    hook: Hook,
    variable: str,
    listen: Listen,
    who: Account | None,
) -> Finding | None:
    """A finding when ``hook`` is (or plainly means to be) callahead's; None if it is
    another program's."""
    label = f"{service} {hook.kind} {hook}"
    if listen.kind == "inet":
        parsed = split_inet(hook.address)
        if parsed is None or not same_inet(listen, *parsed):
            return None
        problem = inet_reach(*parsed)
        if problem:
            return Finding(
                "hook",
                False,
                f"{label}: nothing answers: {problem}",
                f"start callahead (systemctl start callahead) and check {variable}",
            )
        return Finding("hook", True, f"{label}: callahead answers there")
    host_path = view.host_path(service, hook.address)
    target = os.path.realpath(listen.path)
    if os.path.realpath(host_path) != target:
        if service.chroot and os.path.normpath(hook.address) == os.path.normpath(listen.path):
            return Finding(
                "hook",
                False,
                f"{label}: smtpd runs chrooted in {view.queue_directory} (master.cf), so it "
                f"looks for {host_path}, not {listen.path}",
                f"name it relative to the queue directory: {postfix_name(view, listen)}",
            )
        return None
    problem = unix_reach(host_path, who)
    if problem:
        return Finding(
            "hook",
            False,
            f"{label}: Postfix cannot connect: {problem}",
            "run callahead with Group=postfix and UMask=0007 (the shipped unit), "
            f"its socket in {view.queue_directory}/callahead (root:postfix 0770)",
        )
    chroot = "chrooted, " if service.chroot else ""
    return Finding("hook", True, f"{label}: {chroot}{host_path} reachable as postfix")


def check_exposure(config: Config, view: PostfixView) -> list[Finding]:
    """The ``exposure`` item: who else but Postfix can reach each front end. A TCP port
    (even on loopback) or a unix socket that every local user can reach or replace is a
    warning, not a failure: mail is verified all the same, and TCP is the operator's
    choice (a Postfix on another host needs it); the warning says what it costs."""
    findings = []
    directory = f"{view.queue_directory.rstrip('/')}/callahead"
    for kind, variable, listen in _listens(config):
        exposure = tcp_exposure(variable, listen)
        if exposure is not None:
            what, fix = exposure
            findings.append(Finding("exposure", True, f"{kind} {what}", fix, warn=True))
            continue
        exposed, why = local_exposure(listen.path)
        findings.append(
            Finding(
                "exposure",
                True,
                f"{kind} {listen}: {why}",
                f"put the socket in {directory} (root:postfix 0770, the package's tmpfiles "
                "entry) and run callahead with UMask=0007 (the shipped unit)",
                warn=exposed,
            )
        )
    return findings


def _option(view: PostfixView, attached: Attached, option: str, setting: str) -> tuple[str, str]:
    """(value, where it is set) of a per-entry option or its main.cf setting."""
    hook = attached.hook
    if option in hook.options:
        return hook.options[option], f"{option} in {hook.kind} entry {hook}"
    return view.setting(attached.service, setting), setting


def check_default_actions(view: PostfixView, attached: Sequence[Attached]) -> list[Finding]:
    findings = []
    for one in attached:
        if one.hook.kind == "milter":
            value, where = _option(view, one, "default_action", "milter_default_action")
            good, fix = value.lower() == "accept", "milter_default_action = accept"
        else:
            value, where = _option(
                view, one, "default_action", "smtpd_policy_service_default_action"
            )
            good, fix = value.upper() == "DUNNO", "smtpd_policy_service_default_action = DUNNO"
        what = f"{one.service} {one.hook}: {where} = {value}"
        if not good:
            what += ": while callahead is down or slow, mail is not accepted"
        findings.append(Finding("default-action", good, what, fix))
    return findings


def check_answer_time(
    config: Config, view: PostfixView, attached: Sequence[Attached]
) -> list[Finding]:
    findings = []
    for one in attached:
        if one.hook.kind == "milter":
            value, where = _option(view, one, "command_timeout", "milter_command_timeout")
        else:
            value, where = _option(view, one, "timeout", "smtpd_policy_service_timeout")
            value = value or POLICY_TIMEOUT_DEFAULT
        seconds = postfix_seconds(value)
        if seconds is None:
            findings.append(
                Finding(
                    "answer-time", False, f"{where} = {value!r} is not a time", f"{where} = 30s"
                )
            )
            continue
        problem = answer_time_problem(config, seconds, where)
        findings.append(
            Finding(
                "answer-time",
                problem is None,
                problem
                or f"{one.service} {one.hook}: {where} = {value} is above the longest answer",
                f"raise {where}",
            )
        )
    return findings


def check_rcpt_macros(view: PostfixView, attached: Sequence[Attached]) -> list[Finding]:
    findings = []
    for one in attached:
        if one.hook.kind != "milter":
            continue
        macros = view.setting(one.service, "milter_rcpt_macros").split()
        missing = [m for m in RCPT_MACROS if m not in macros]
        protocol, where = _option(view, one, "protocol", "milter_protocol")
        if not missing:
            findings.append(
                Finding(
                    "rcpt-macros",
                    True,
                    f"{one.service} {one.hook}: milter_rcpt_macros has {' '.join(RCPT_MACROS)}",
                )
            )
        elif protocol.strip().isdigit() and int(protocol) >= 6:
            findings.append(
                Finding(
                    "rcpt-macros",
                    True,
                    f"{one.service} {one.hook}: callahead asks for {' '.join(missing)} at "
                    f"negotiation ({where} = {protocol} lets a milter name its macros; "
                    "milter_rcpt_macros need not list them)",
                )
            )
        else:
            findings.append(
                Finding(
                    "rcpt-macros",
                    False,
                    f"{one.service} {one.hook}: {where} = {protocol} and milter_rcpt_macros lacks "
                    f"{' '.join(missing)}: no queue id in the log, and the dictionary-attack guard "
                    "cannot tell clients apart",
                    f"milter_rcpt_macros = {' '.join(dict.fromkeys([*macros, *missing]))} "
                    "(or milter_protocol = 6)",
                )
            )
    return findings


def check_policy_order(view: PostfixView, attached: Sequence[Attached]) -> list[Finding]:
    findings = []
    relay_checks = ("reject_unauth_destination", "defer_unauth_destination")
    for one in attached:
        if one.hook.kind != "policy":
            continue
        items = [i.lower() for i in split_list(view.setting(one.service, one.hook.restrictions))]
        before = any(i in relay_checks for i in items[: one.hook.position])
        if not before and one.hook.restrictions == "smtpd_recipient_restrictions":
            relay = split_list(view.setting(one.service, "smtpd_relay_restrictions"))
            before = any(i.lower() in relay_checks for i in relay)
        what = f"{one.service} check_policy_service {one.hook} in {one.hook.restrictions}"
        findings.append(
            Finding(
                "policy-order",
                before,
                what
                + (
                    " comes after reject_unauth_destination"
                    if before
                    else " comes before any reject_unauth_destination: callahead is asked about "
                    "domains this host does not relay, and mail for them is not refused first"
                ),
                f"{one.hook.restrictions} = permit_mynetworks, reject_unauth_destination, "
                f"check_policy_service {one.hook}",
            )
        )
    return findings


def postfix_findings(
    config: Config, view: PostfixView, who: Account | None = None
) -> list[Finding]:
    """Every Postfix-side item."""
    user = account() if who is None else who
    hooks, attached = check_hooks(config, view, user)
    return [
        *hooks,
        *check_exposure(config, view),
        *check_default_actions(view, attached),
        *check_answer_time(config, view, attached),
        *check_rcpt_macros(view, attached),
        *check_policy_order(view, attached),
    ]


def report(findings: Iterable[Finding]) -> tuple[list[str], bool]:
    """The lines to print, and whether every item passed (a warning passes)."""
    lines: list[str] = []
    passed = True
    for finding in findings:
        lines += finding.lines()
        passed = passed and finding.ok is not False
    return lines, passed
