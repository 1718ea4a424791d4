"""``callahead report``: per recipient domain, what callahead refused at RCPT (the
backscatter it prevented), what it accepted by its reason, and what became of that
(sent, bounced and of those the backscatter, deferred, expired, unknown).

Two sources (``--from``):

- ``daemon``: the running ``serve``, over the admin socket: its counts since it started
  (frontends/maillog/tally.py), fates counted when it reads the mail log
  (``CALLAHEAD_MAILLOG``);
- ``log``: the logs alone (frontends/maillog/replay.py): ``--log FILE``, repeatable,
  holding callahead's decision lines and Postfix's lines; without it, callahead's unit's
  journal and Postfix's lines from ``CALLAHEAD_MAILLOG`` when that is a file, else from
  the journal too.

Without ``--from``: the logs when ``--since`` or ``--log`` is given (serve's counts
cannot be cut by time), else serve when it answers, else the logs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from ..frontends.adminclient import AdminUnavailable, ask
from ..frontends.maillog.replay import Replay, ReplayError, read_journal
from ..frontends.maillog.tally import FATES
from .config import Config

EX_USAGE = 64
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
COLUMNS = ("accepted", *FATES, "unknown")


DESCRIPTION = textwrap.fill(
    "Per recipient domain: what callahead refused at RCPT (550: the "
    "backscatter it prevented), what it accepted by reason, and what became of it in "
    "the mail log: sent, bounced (backscatter: a non-delivery notification went to "
    "the sender), deferred (no fate yet), expired, unknown (no fate read). Sources: "
    "--from daemon, the running serve over CALLAHEAD_ADMIN_SOCKET (its counts since "
    "it started; fates when CALLAHEAD_MAILLOG is set); --from log, the logs alone "
    "(--log files, else callahead's journal and CALLAHEAD_MAILLOG's file or the "
    "journal). Default: the logs when --since or --log is given, else serve when it "
    "answers, else the logs. Exit 64 usage error, 66 a log cannot be read, 69 serve "
    "does not answer (--from daemon).",
    88,
)


class ReportUsageError(ValueError):
    pass


def add_report_parser(sub: Any, common: Mapping[str, Any]) -> None:
    report = sub.add_parser(
        "report",
        help="per domain: refused at RCPT, accepted by reason, and what became of it",
        description=DESCRIPTION,
        **common,
    )
    report.add_argument(
        "--since",
        metavar="WHEN",
        help="only lines from WHEN on: a duration back from now (90m, 24h, 7d) or a "
        "local time (2026-12-07, 2026-12-07T08:00); the logs only",
    )
    report.add_argument("--domain", metavar="DOMAIN", help="this recipient domain only")
    report.add_argument(
        "--from", dest="source", choices=("daemon", "log"), help="where the counts come from"
    )
    report.add_argument(
        "--log",
        action="append",
        default=[],
        metavar="FILE",
        help="a log file with callahead's decision lines and/or Postfix's lines (.gz "
        "too); repeat for more",
    )
    report.add_argument("--json", action="store_true", help="print JSON, not a table")


def parse_since(text: str, now: float) -> float:
    """Unix time of ``--since``."""
    found = _DURATION.fullmatch(text.strip())
    if found is not None:
        return now - int(found[1]) * _UNITS[found[2]]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ReportUsageError(
            f"--since {text!r}: expected a duration (90m, 24h, 7d) or a time "
            "(2026-12-07, 2026-12-07T08:00)"
        ) from None


def run_report(config: Config, args: argparse.Namespace, now: float | None = None) -> int:
    now = time.time() if now is None else now
    try:
        since = None if args.since is None else parse_since(args.since, now)
    except ReportUsageError as exc:
        print(f"callahead: {exc}", file=sys.stderr)
        return EX_USAGE
    source: str | None = args.source
    if source == "daemon" and (since is not None or args.log):
        print(
            "callahead: --since and --log read the logs (--from log): serve's counts are "
            "since it started",
            file=sys.stderr,
        )
        return EX_USAGE
    report: dict[str, Any] | None = None
    if source != "log" and since is None and not args.log:
        report, why = _from_daemon(config)
        if report is None and source == "daemon":
            print(f"callahead: {why}", file=sys.stderr)
            return EX_UNAVAILABLE
        if report is None:
            print(f"callahead: {why}: reading the logs", file=sys.stderr)
    if report is None:
        try:
            report = from_logs(config, args.log, since)
        except ReplayError as exc:
            print(f"callahead: {exc}", file=sys.stderr)
            return EX_NOINPUT
    domain = (args.domain or "").strip().lstrip("@").lower()
    if domain:
        report["domains"] = {k: v for k, v in report["domains"].items() if k == domain}
    for counts in report["domains"].values():
        for row in counts["accepted"].values():
            row["unknown"] = max(
                0, row["accepted"] - sum(row[f] for f in FATES if f != "backscatter")
            )
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        for line in table(report):
            print(line)
    return 0


def _from_daemon(config: Config) -> tuple[dict[str, Any] | None, str]:
    if not config.admin_socket:
        return None, "CALLAHEAD_ADMIN_SOCKET is empty: no serve to ask"
    try:
        answer = ask(config.admin_socket, {"op": "report"})
    except AdminUnavailable as exc:
        return None, str(exc)
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else answer
        return None, f"serve refused the request: {error}"
    return {
        "source": "daemon",
        "since": answer["since"],
        "until": time.time(),
        "metered": answer["metered"],
        "domains": answer["domains"],
    }, ""


def from_logs(config: Config, files: list[str], since: float | None) -> dict[str, Any]:
    replay = Replay(since)
    if files:
        for path in files:
            replay.add_file(path)
        where = ", ".join(files)
    else:
        maillog = config.maillog
        postfix_file = bool(maillog) and maillog != "journal" and os.path.isfile(maillog)
        read_journal(replay, since, postfix=not postfix_file)
        if postfix_file:
            replay.add_file(maillog)
        where = f"the journal and {maillog}" if postfix_file else "the journal"
    if not replay.decisions:
        print(
            f"callahead: no callahead decision lines in {where}: give callahead's own log "
            "with --log (e.g. journalctl -u callahead > FILE)",
            file=sys.stderr,
        )
    tally = replay.tally()
    return {
        "source": "log",
        "logs": where,
        "since": since if since is not None else replay.first,
        "until": replay.last,
        "metered": bool(replay.fates),
        "lines": replay.lines,
        "domains": tally.snapshot(),
    }


def _when(stamp: object) -> str:
    if not isinstance(stamp, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def table(report: Mapping[str, Any]) -> Iterable[str]:
    if report["source"] == "daemon":
        yield f"callahead report from the running serve, since {_when(report['since'])}"
        if not report["metered"]:
            yield "(CALLAHEAD_MAILLOG is empty: no fates read, all are unknown)"
    else:
        yield (
            f"callahead report from {report['logs']}, {_when(report['since'])} to "
            f"{_when(report['until'])} ({report['lines']} lines)"
        )
    if not report["domains"]:
        yield "no recipients judged"
    width = max([len(r) for d in report["domains"].values() for r in d["accepted"]] + [14])
    for name, counts in report["domains"].items():
        yield ""
        yield f"{name}"
        yield from _refusals("refused at RCPT (550, backscatter prevented)", counts["refused"])
        yield from _refusals("deferred at RCPT (4xx, the sender retries)", counts["deferred"])
        rows = counts["accepted"]
        yield "  accepted, by reason, and what became of it:"
        yield "    " + f"{'reason':<{width}}" + "".join(f"{c:>{len(c) + 2}}" for c in COLUMNS)
        total = dict.fromkeys(COLUMNS, 0)
        for reason in sorted(rows):
            row = rows[reason]
            for c in COLUMNS:
                total[c] += row[c]
            yield "    " + f"{reason:<{width}}" + _cells(row)
        if len(rows) > 1:
            yield "    " + f"{'total':<{width}}" + _cells(total)


def _cells(row: Mapping[str, int]) -> str:
    return "".join(f"{row[c]:>{len(c) + 2}}" for c in COLUMNS)


def _refusals(title: str, by_reason: Mapping[str, int]) -> Iterable[str]:
    yield f"  {title}: {sum(by_reason.values())}"
    for reason in sorted(by_reason):
        yield f"    {reason:<20}{by_reason[reason]:>8}"
