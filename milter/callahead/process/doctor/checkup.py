"""``callahead doctor``: a live installation checked item by item, each failure with its
fix; exit 0 only when every item passes, 1 when one fails.

It reads callahead's configuration as the unit does (``/etc/default/callahead``, the
unit's ``EnvironmentFile``, over the shell's environment) and the backup's Postfix
(``/etc/postfix``, or ``MAIL_CONFIG``), then checks, in order:

- ``hook``: an smtpd service attaches callahead (``smtpd_milters`` or
  ``check_policy_service``) at the address where it listens, and the ``postfix`` user
  can connect there (from inside smtpd's chroot, with the socket's permissions);
- ``exposure``: no one else can: a TCP port (every local user can reach it) or a unix
  socket that every local user can reach or replace is a warning (exit status 0);
- ``default-action``: while callahead is down or slow, Postfix accepts the mail;
- ``answer-time``: Postfix waits longer than callahead's longest answer;
- ``rcpt-macros``: the milter gets the queue id and the client address at RCPT;
- ``policy-order``: ``check_policy_service`` comes after ``reject_unauth_destination``;
- ``routes``: every relay domain has a route;
- ``mx-targets``: an MX route's addresses that are never probed (loopback, unspecified,
  link-local, multicast) are named: a warning, a failure when none is left;
- ``primary``: every primary answers and takes the probes' EHLO name;
- ``prober`` and ``probe``: the primary judges recipients: a real address is valid, a
  made-up one unknown (or the domain is reported as catch-all).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence

from ...base.address import normalize_recipient
from ...base.errors import CallaheadError
from ...routing.postfixsettings import PostfixConfigError
from ..config import Config
from ..postfixconf import DEFAULT_POSTFIX_CONFIG
from .postfixhooks import Finding, postfix_findings, report
from .postfixview import PostfixView, read_postfix
from .probes import check_primaries, check_routes, relay_domains

ENV_FILE = "/etc/default/callahead"
"""The unit's EnvironmentFile, read by default when it exists."""
EX_FAILED = 1


class EnvFileError(CallaheadError):
    """The environment file cannot be read."""


class DoctorUsageError(CallaheadError):
    """A ``--known`` that is not an address."""


def read_env_file(path: str) -> dict[str, str]:
    """``NAME=value`` lines as systemd's EnvironmentFile takes them (blank lines and
    ``#`` comments skipped, one pair of surrounding quotes removed)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise EnvFileError(f"cannot read {path}: {exc}") from None
    values: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        name, sep, value = stripped.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def doctor_environment(env: Mapping[str, str], env_file: str | None) -> dict[str, str]:
    """The environment doctor configures itself from: ``env_file`` (None: ENV_FILE if
    it exists; empty: none) over ``env``."""
    merged = dict(env)
    path = ENV_FILE if env_file is None and os.path.exists(ENV_FILE) else env_file
    if path:
        merged.update(read_env_file(path))
    return merged


def known_addresses(addresses: Sequence[str]) -> dict[str, str]:
    """``--known`` addresses by domain; raises DoctorUsageError for one that is not."""
    known: dict[str, str] = {}
    for text in addresses:
        normalized = normalize_recipient(text)
        if normalized is None:
            raise DoctorUsageError(f"--known {text!r} is not an address (expected user@domain)")
        known.setdefault(normalized.domain, normalized.address)
    return known


async def _primary_side(
    config: Config, view: PostfixView, known: Mapping[str, str]
) -> list[Finding]:
    domains, notes = relay_domains(view)
    findings, routed = await check_routes(config, domains)
    return [*notes, *findings, *await check_primaries(config, routed, known)]


def run_doctor(config: Config, config_dir: str | None, known: Mapping[str, str]) -> int:
    """Print every item; 0 when all pass, 1 when one fails."""
    directory = config_dir or os.environ.get("MAIL_CONFIG") or DEFAULT_POSTFIX_CONFIG
    print(f"callahead doctor: Postfix {directory}")
    try:
        view = read_postfix(directory)
    except PostfixConfigError as exc:
        lines, _ = report(
            [
                Finding(
                    "postfix",
                    False,
                    f"cannot read it: {exc}",
                    "point --postfix (or MAIL_CONFIG) at the backup's main.cf",
                )
            ]
        )
        print("\n".join(lines))
        return EX_FAILED
    findings = postfix_findings(config, view)
    findings += asyncio.run(_primary_side(config, view, known))
    lines, passed = report(findings)
    print("\n".join(lines))
    failed = sum(1 for f in findings if f.ok is False)
    warned = sum(1 for f in findings if f.warn and f.ok is not False)
    warnings = f", {warned} with a warning" if warned else ""
    print(
        f"all items pass{warnings}"
        if passed
        else f"{failed} item{'s' if failed != 1 else ''} failed{warnings}"
    )
    return 0 if passed else EX_FAILED
