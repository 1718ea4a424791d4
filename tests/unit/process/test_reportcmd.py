"""``callahead report``: from the logs alone (callahead's decision lines as serve writes
them, Postfix 3.7's lines as the meter's tests hold them) and from a running serve over
its admin socket (its tally fed by the meter), through the real command line."""

from __future__ import annotations

import gzip
import io
import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, cast

import pytest
from prometheus_client import CollectorRegistry

from callahead.caching.cache import PositiveCache
from callahead.core.policy import Action, Decision, Policy, Reason
from callahead.frontends.admin import AdminServer, Health, report_answer
from callahead.frontends.judge import Judge
from callahead.frontends.maillog.follow import Pump
from callahead.frontends.maillog.ledger import Ledger
from callahead.frontends.maillog.lines import Fate, parse_line
from callahead.frontends.maillog.meter import MaillogMetrics
from callahead.frontends.maillog.replay import Replay, read_journal
from callahead.frontends.maillog.tally import OTHER, DomainTally
from callahead.frontends.metrics import Metrics
from callahead.probing.loop import ProbeLoop
from callahead.process import logoutput
from callahead.process.cli import main
from tests.unit.frontends import test_maillog_lines as postfix

QID = "3EFFD2201A9"
OPENED = (
    "Dec 07 12:42:45 backup postfix-backup/smtpd[17400]: 3EFFD2201A9: client=localhost[127.0.0.1]"
)
"""smtpd's line as the queue file opens (``src/smtpd/smtpd.c``: ``%s: client=%s``)."""


def decision_lines(decisions: list[tuple[str, Decision]]) -> list[str]:
    """The lines serve writes for these decisions: its Judge, its log format."""
    stream = io.StringIO()
    handler = logoutput.BufferedHandler(stream, delay=0.0)
    handler.setFormatter(logoutput.SecondFormatter())
    logger = logging.getLogger("callahead.decision")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        judge = Judge(cast(Policy, None), Metrics())
        for queue_id, decision in decisions:
            judge._done(decision, "127.0.0.1", queue_id)
        handler.flush()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return stream.getvalue().splitlines()


def at(line: str, when: float) -> str:
    """A Postfix line of the meter's tests, at ``when`` (maillog_file's stamp)."""
    return time.strftime("%b %d %H:%M:%S", time.localtime(when)) + line[15:]


DECISIONS = [
    ("NOQUEUE", Decision(Action.ACCEPT, Reason.PRIMARY_DOWN, "known-milter@meter.test")),
    (QID, Decision(Action.ACCEPT, Reason.PRIMARY_DOWN, "gone-milter@meter.test")),
    (QID, Decision(Action.REJECT, Reason.PROBE_UNKNOWN, "nobody@meter.test")),
    ("NOQUEUE", Decision(Action.REJECT, Reason.PROBE_UNKNOWN, "no one@meter.test")),
    ("4DqG1x0Hk9z9vQ8", Decision(Action.ACCEPT, Reason.CACHE_HIT, "user@other.test")),
    ("NOQUEUE", Decision(Action.DEFER, Reason.PROBE_TEMPFAIL, "slow@other.test")),
    ("NOQUEUE", Decision(Action.SKIP, Reason.UNROUTED, "x@unrouted.test")),
]


def postfix_lines(when: float) -> list[str]:
    """The message's life: queued (after the first recipient), deferred twice, sent and
    bounced with a notification to the sender, removed."""
    return [
        at(OPENED, when),
        at(postfix.DEFERRED, when + 1),
        at(postfix.DEFERRED.replace("known-milter", "gone-milter"), when + 1),
        at(postfix.DEFERRED, when + 300),
        at(postfix.SENT, when + 600),
        at(postfix.BOUNCED, when + 600),
        at(postfix.NOTIFICATION, when + 600),
        at(postfix.REMOVED, when + 600),
    ]


@pytest.fixture
def logs(tmp_path: Path) -> tuple[Path, Path]:
    """callahead's log and the backup's mail log, two hours of them, as two files."""
    start = time.time() - 3600
    own, maillog = tmp_path / "callahead.log", tmp_path / "maillog"
    own.write_text("\n".join(decision_lines(DECISIONS)) + "\n")
    # Decision lines are stamped now: shift them to ``start``, as if written then.
    text = own.read_text()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    own.write_text("\n".join(stamp + line[19:] for line in text.splitlines()) + "\n")
    maillog.write_text("\n".join(postfix_lines(start)) + "\n")
    return own, maillog


EXPECTED = {
    "meter.test": {
        "refused": {"probe_unknown": 2},
        "deferred": {},
        "accepted": {
            "primary_down": {
                "accepted": 2,
                "sent": 1,
                "bounced": 1,
                "backscatter": 1,
                "deferred": 0,
                "expired": 0,
                "unknown": 0,
            }
        },
    },
    "other.test": {
        "refused": {},
        "deferred": {"probe_tempfail": 1},
        "accepted": {
            "cache_hit": {
                "accepted": 1,
                "sent": 0,
                "bounced": 0,
                "backscatter": 0,
                "deferred": 0,
                "expired": 0,
                "unknown": 1,
            }
        },
    },
}


def report_json(capsys: pytest.CaptureFixture[str], *args: str, env: dict[str, str]) -> Any:
    assert main(["report", "--json", *args], env=env) == 0
    return json.loads(capsys.readouterr().out)


def test_from_the_logs_alone(logs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    own, maillog = logs
    env = {"CALLAHEAD_ADMIN_SOCKET": ""}
    report = report_json(capsys, "--log", str(own), "--log", str(maillog), env=env)
    assert report["source"] == "log"
    assert report["domains"] == EXPECTED
    # The table says the same.
    assert main(["report", "--log", str(maillog), "--log", str(own)], env=env) == 0
    out = capsys.readouterr().out
    assert "refused at RCPT (550, backscatter prevented): 2" in out
    row = next(line.split() for line in out.splitlines() if "primary_down" in line)
    assert row == ["primary_down", "2", "1", "1", "1", "0", "0", "0"]
    # One domain only; the logs in one file (decisions first) join the same.
    joined = own.with_name("all.log")
    joined.write_text(own.read_text() + maillog.read_text())
    report = report_json(capsys, "--log", str(joined), "--domain", "@Meter.TEST", env=env)
    assert report["domains"] == {"meter.test": EXPECTED["meter.test"]}
    # A rotated, compressed mail log reads the same.
    rotated = maillog.with_name("maillog.1.gz")
    rotated.write_bytes(gzip.compress(maillog.read_bytes()))
    report = report_json(capsys, "--log", str(own), "--log", str(rotated), env=env)
    assert report["domains"] == EXPECTED


def test_since_leaves_out_what_is_older(
    logs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    own, maillog = logs
    env = {"CALLAHEAD_ADMIN_SOCKET": ""}
    # The decisions were an hour ago, the fates 50 minutes ago: 55 minutes sees none of
    # the decisions, so no fate joins.
    report = report_json(
        capsys, "--since", "55m", "--log", str(own), "--log", str(maillog), env=env
    )
    assert report["domains"] == {}
    report = report_json(capsys, "--since", "2h", "--log", str(own), "--log", str(maillog), env=env)
    assert report["domains"] == EXPECTED
    day = datetime.fromtimestamp(time.time() - 86400).strftime("%Y-%m-%dT%H:%M")
    report = report_json(capsys, "--since", day, "--log", str(own), "--log", str(maillog), env=env)
    assert report["domains"] == EXPECTED


def test_bad_input_exits_64_or_66(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"CALLAHEAD_ADMIN_SOCKET": ""}
    assert main(["report", "--since", "yesterday"], env=env) == 64
    assert "--since 'yesterday'" in capsys.readouterr().err
    assert main(["report", "--from", "daemon", "--since", "1h"], env=env) == 64
    missing = tmp_path / "nothing.log"
    assert main(["report", "--log", str(missing)], env=env) == 66
    assert f"cannot read the log {missing}: No such file or directory" in capsys.readouterr().err
    assert main(["report", "--from", "daemon"], env=env) == 69


def test_a_postfix_line_quoting_a_decision_is_not_one(tmp_path: Path) -> None:
    [line] = decision_lines([(QID, DECISIONS[1][1])])
    forged = (
        "Dec 07 12:42:45 backup postfix/smtpd[17400]: NOQUEUE: reject: RCPT from x[192.0.2.9]: "
        f"550 5.1.1 <a@meter.test>: no; from=<{line}> to=<a@meter.test>"
    )
    path = tmp_path / "maillog"
    path.write_text(forged + "\n" + line + "\n")
    replay = Replay()
    replay.add_file(str(path))
    assert replay.decisions == 1


def test_from_the_journal(logs: tuple[Path, Path]) -> None:
    own, maillog = logs
    entries: list[dict[str, object]] = []
    for line in own.read_text().splitlines():
        when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        entries.append(
            {"__REALTIME_TIMESTAMP": when, "_SYSTEMD_UNIT": "callahead.service", "MESSAGE": line}
        )
    for line in maillog.read_text().splitlines():
        when = datetime.fromtimestamp(
            time.mktime(
                time.strptime(f"{time.localtime().tm_year} {line[:15]}", "%Y %b %d %H:%M:%S")
            )
        )
        program, _, message = line[23:].partition(": ")
        entries.append(
            {
                "__REALTIME_TIMESTAMP": when,
                "SYSLOG_IDENTIFIER": program.split("[")[0],
                "MESSAGE": message,
            }
        )
    entries.sort(key=lambda e: cast(datetime, e["__REALTIME_TIMESTAMP"]))

    class Reader:
        matches: ClassVar[list[dict[str, str]]] = []

        def __init__(self) -> None:
            self._left = list(entries)

        def add_match(self, **match: str) -> None:
            Reader.matches.append(match)

        def add_disjunction(self) -> None:
            pass

        def get_next(self) -> dict[str, object]:
            return self._left.pop(0) if self._left else {}

        def close(self) -> None:
            pass

    replay = Replay()
    read_journal(replay, None, postfix=True, reader_class=Reader)
    assert Reader.matches == [{"_SYSTEMD_UNIT": "callahead.service"}, {"SYSLOG_FACILITY": "2"}]
    snapshot = replay.tally().snapshot()
    assert snapshot["meter.test"]["accepted"]["primary_down"]["backscatter"] == 1
    assert snapshot["meter.test"]["accepted"]["primary_down"]["sent"] == 1


def test_the_tally_is_bounded_in_domains() -> None:
    tally = DomainTally(max_domains=3)
    for n in range(10):
        tally.decided(Decision(Action.REJECT, Reason.PROBE_UNKNOWN, f"u@d{n}.test"))
    snapshot = tally.snapshot()
    assert sorted(snapshot) == ["d0.test", "d1.test", "d2.test", OTHER]
    assert snapshot[OTHER]["refused"] == {"probe_unknown": 7}


def test_refused_names_give_their_place_to_a_domain_with_accepted_mail() -> None:
    # A flood of made-up subdomains under a parent route fills the tally with refusals;
    # a relay domain whose mail callahead accepts still gets a row of its own.
    tally = DomainTally(max_domains=3)
    tally.decided(Decision(Action.ACCEPT, Reason.PROBE_VALID, "u@real.test"))
    for n in range(10):
        tally.decided(Decision(Action.REJECT, Reason.NO_DOMAIN, f"u@r{n}.real.test"))
    tally.decided(Decision(Action.ACCEPT, Reason.CACHE_HIT, "v@late.test"))
    tally.fate("later.test", "probe_valid", Fate.SENT, None)
    snapshot = tally.snapshot()
    assert set(snapshot) == {"late.test", "later.test", "real.test", OTHER}
    assert snapshot["late.test"]["accepted"]["cache_hit"]["accepted"] == 1
    assert snapshot["later.test"]["accepted"]["probe_valid"]["sent"] == 1
    # Nothing counted is lost: the two refused names that had places are in OTHER too.
    assert snapshot[OTHER]["refused"] == {"no_domain": 10}
    assert snapshot["real.test"]["accepted"]["probe_valid"]["accepted"] == 1
    # With no refusal-only place left, another accepted domain goes to OTHER.
    tally.decided(Decision(Action.ACCEPT, Reason.PROBE_VALID, "w@last.test"))
    assert tally.snapshot()[OTHER]["accepted"]["probe_valid"]["accepted"] == 1


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, DomainTally, Ledger, MaillogMetrics]]:
    """An admin socket answering ``report`` from a tally the meter feeds."""
    tally = DomainTally()
    metrics = MaillogMetrics(CollectorRegistry())
    ledger = Ledger(metrics, tally=tally)
    loop = ProbeLoop()
    loop.start()
    server = AdminServer(
        PositiveCache(ttl=60, maxsize=10),
        lambda: Health(True, 0.1, [], False),
        dict,
        report=lambda: report_answer(tally, metered=True),
    )
    path = tmp_path / "admin.sock"
    loop.run(server.start(str(path)), timeout=5)
    try:
        yield path, tally, ledger, metrics
    finally:
        loop.run(server.aclose(), timeout=5)
        loop.stop()


def test_from_the_running_serve(
    serve: tuple[Path, DomainTally, Ledger, MaillogMetrics],
    logs: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, tally, ledger, metrics = serve
    judge = Judge(cast(Policy, None), Metrics(), ledger, tally)  # as serve wires them
    for queue_id, decision in DECISIONS:
        judge._done(decision, "127.0.0.1", queue_id)
        if decision.action is Action.ACCEPT:
            ledger.accepted(
                queue_id if queue_id != "NOQUEUE" else QID, decision.address, decision.reason.value
            )
    Pump(cast(Any, None), ledger, metrics).feed(
        parse_line(line) for line in logs[1].read_text().splitlines()
    )
    env = {"CALLAHEAD_ADMIN_SOCKET": str(path)}
    report = report_json(capsys, env=env)
    assert report["source"] == "daemon"
    assert report["domains"] == EXPECTED
    assert main(["report", "--from", "daemon", "--domain", "meter.test"], env=env) == 0
    out = capsys.readouterr().out
    assert out.startswith("callahead report from the running serve, since ")
    assert "other.test" not in out
    row = next(line.split() for line in out.splitlines() if "primary_down" in line)
    assert row == ["primary_down", "2", "1", "1", "1", "0", "0", "0"]
