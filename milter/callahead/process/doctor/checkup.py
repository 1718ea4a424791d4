"""``callahead doctor``: a live installation checked item by item, each failure with its
fix; exit 0 only when every item passes, 1 when one fails.

It reads callahead's configuration as the unit does (``/etc/default/callahead``, the
unit's ``EnvironmentFile``, over the unit's own ``Environment=`` lines, such as the
package's drop-in that keeps 0.1's TCP listener, over the shell's environment) and the
backup's Postfix
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
- ``redis``: a ``CALLAHEAD_REDIS_URL`` that is set is used (one without a password off
  loopback turns the shared cache off);
- ``maillog``: the backscatter meter (``CALLAHEAD_MAILLOG``) can read Postfix's log as
  the unit runs (maillogcheck.py);
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
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from ...base.address import normalize_recipient
from ...base.errors import CallaheadError
from ...base.logfmt import redact_url
from ...routing.postfixsettings import PostfixConfigError
from ..config import Config
from ..postfixconf import DEFAULT_POSTFIX_CONFIG
from .maillogcheck import maillog_findings
from .postfixhooks import Finding, postfix_findings, report
from .postfixview import PostfixView, read_postfix
from .probes import check_primaries, check_routes, relay_domains
from .sentinelcheck import sentinel_findings

ENV_FILE = "/etc/default/callahead"
"""The unit's EnvironmentFile, read by default when it exists."""
UNIT = "callahead.service"
SYSTEMD_RUNNING = "/run/systemd/system"
"""Exists while systemd is the init system (sd_booted(3))."""
SYSTEMCTL_TIMEOUT = 5.0
UNPRINTABLE = "[unprintable]"
"""What ``systemctl show`` prints for a value with a space or a newline."""
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


def parse_unit_environment(text: str) -> tuple[dict[str, str], int]:
    """``systemctl show -p Environment --value``'s ``NAME=value`` words, and how many
    it could not print (a value with a space shows as ``[unprintable]``)."""
    values: dict[str, str] = {}
    unprintable = 0
    for word in text.split():
        name, sep, value = word.partition("=")
        if word == UNPRINTABLE or not sep or not name:
            unprintable += 1
            continue
        values[name] = value
    return values, unprintable


def unit_environment(unit: str = UNIT, running: str = SYSTEMD_RUNNING) -> dict[str, str]:
    """The unit's own ``Environment=`` (its drop-ins' too) when systemd runs and knows
    the unit; empty without systemd or systemctl, or when it fails. A value systemctl
    cannot print is named on standard error."""
    systemctl = shutil.which("systemctl")
    if not os.path.isdir(running) or systemctl is None:
        return {}
    try:
        done = subprocess.run(
            [systemctl, "show", "-p", "Environment", "--value", unit],
            capture_output=True,
            text=True,
            timeout=SYSTEMCTL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return {}
    if done.returncode != 0:
        return {}
    values, unprintable = parse_unit_environment(done.stdout)
    if unprintable:
        print(
            f"callahead doctor: {unit}'s Environment= has {unprintable} value(s) with a "
            "space that systemctl show cannot print: left out (put them in "
            f"{ENV_FILE} instead)",
            file=sys.stderr,
        )
    return values


def doctor_environment(
    env: Mapping[str, str],
    env_file: str | None,
    unit: Callable[[], Mapping[str, str]] = unit_environment,
) -> dict[str, str]:
    """The environment doctor configures itself from, as the unit sees it: ``env_file``
    (None: ENV_FILE if it exists; empty: none) over, when ``env_file`` is None, the
    unit's ``Environment=`` lines (systemd: EnvironmentFile wins over Environment=),
    over ``env``."""
    merged = dict(env)
    if env_file is None:
        merged.update(unit())
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


def redis_findings(config: Config) -> list[Finding]:
    """``redis``: the shared cache is on when ``CALLAHEAD_REDIS_URL`` is set (or the
    sentinels: ``sentinelcheck``)."""
    if config.redis_sentinels:
        return sentinel_findings(config)
    if not config.redis_url:
        return []
    url = f"CALLAHEAD_REDIS_URL={redact_url(config.redis_url)}"
    if not config.redis_refused:
        return [Finding("redis", True, f"{url}: the shared cache uses it")]
    return [
        Finding(
            "redis",
            False,
            f"{url} is not used, the shared cache is off: {config.redis_refused}",
            "give Redis a password (requirepass, or an ACL user) and put it in the URL: "
            "CALLAHEAD_REDIS_URL=redis://:PASSWORD@HOST:PORT/DB",
        )
    ]


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
                ),
                *redis_findings(config),
            ]
        )
        print("\n".join(lines))
        return EX_FAILED
    findings = postfix_findings(config, view) + redis_findings(config)
    findings += maillog_findings(config.maillog, view.main)
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
