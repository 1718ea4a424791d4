"""``callahead doctor``'s ``maillog`` item (doctor/maillogcheck.py): whether the
backscatter meter will read Postfix's log as the unit runs. ``systemctl show`` is a
function answering as systemd 252 does, python3-systemd a stand-in module; the files
are real, in a directory every user can enter (as /var/log is)."""

from __future__ import annotations

import datetime
import grp
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from callahead.process.doctor.maillogcheck import maillog_findings
from callahead.process.doctor.postfixhooks import Finding
from callahead.process.doctor.unitidentity import PROPERTIES, systemctl_show, unit_identity

NOW = 1_800_000_000.0
SHIPPED = "LoadState=loaded\nUser=\nGroup=postfix\nSupplementaryGroups=\nDynamicUser=yes\n"


def show(text: str | None, asked: list[Sequence[str]] | None = None) -> Any:
    def run(properties: Sequence[str]) -> str | None:
        if asked is not None:
            asked.append(list(properties))
        return text

    return run


def with_groups(*groups: str) -> Any:
    return show(SHIPPED.replace("SupplementaryGroups=", f"SupplementaryGroups={' '.join(groups)}"))


def marks(findings: list[Finding]) -> list[str]:
    return [line for f in findings for line in f.lines()]


class FakeReader:
    def __init__(self, entries: list[dict[str, object]], files: bool = True) -> None:
        self.entries = entries  # newest first, as get_previous walks them
        self.files = files
        self.matches: dict[str, str] = {}
        self.closed = False

    def has_runtime_files(self) -> bool:
        return self.files

    def has_persistent_files(self) -> bool:
        return False

    def add_match(self, **match: str) -> None:
        self.matches.update(match)

    def seek_tail(self) -> None:
        pass

    def get_previous(self) -> dict[str, object]:
        return self.entries.pop(0) if self.entries else {}

    def close(self) -> None:
        self.closed = True


def journal(reader: FakeReader) -> Any:
    return lambda: SimpleNamespace(Reader=lambda: reader)


def entry(program: str, seconds_ago: float) -> dict[str, object]:
    when = datetime.datetime.fromtimestamp(NOW - seconds_ago)
    return {"SYSLOG_IDENTIFIER": program, "__REALTIME_TIMESTAMP": when}


def check_journal(reader: FakeReader, unit: Any, main: dict[str, str] | None = None) -> list[str]:
    found = maillog_findings("journal", main or {}, unit, journal(reader), now=lambda: NOW)
    assert reader.closed
    return marks(found)


def test_an_empty_setting_is_one_line_saying_the_meter_is_off() -> None:
    (line,) = marks(maillog_findings("", {}, show(None)))
    assert line.startswith("--   maillog: CALLAHEAD_MAILLOG is empty: the backscatter meter is off")
    assert "CALLAHEAD_MAILLOG=journal" in line


def test_the_journal_without_python3_systemd_fails_with_the_apt_line() -> None:
    def missing() -> Any:
        raise ImportError("No module named 'systemd'")

    lines = marks(maillog_findings("journal", {}, show(SHIPPED), missing))
    assert lines[0].startswith("FAIL maillog: CALLAHEAD_MAILLOG=journal: python3-systemd")
    assert lines[1] == "     fix: apt install python3-systemd"


def test_the_shipped_unit_cannot_read_the_journal_and_the_fix_is_the_drop_in() -> None:
    asked: list[Sequence[str]] = []
    reader = FakeReader([entry("postfix/smtp", 60)])
    lines = check_journal(reader, show(SHIPPED, asked))
    assert asked == [list(PROPERTIES)]
    assert lines[0] == "ok   maillog: CALLAHEAD_MAILLOG=journal: python3-systemd imports"
    assert lines[1].startswith("FAIL maillog: callahead.service runs with a dynamic user")
    assert "SupplementaryGroups=(none)" in lines[1]
    assert lines[2] == (
        "     fix: systemctl edit callahead, then [Service] "
        "SupplementaryGroups=systemd-journal, and systemctl restart callahead"
    )
    assert lines[3] == "ok   maillog: Postfix's lines are in the journal (postfix/smtp, 1 min ago)"
    assert reader.matches == {"SYSLOG_FACILITY": "2"}


@pytest.mark.parametrize("group", ["systemd-journal", "adm"])
def test_the_journal_group_or_adm_passes(group: str) -> None:
    lines = check_journal(FakeReader([entry("postfix/qmgr", 30)]), with_groups(group))
    assert [line[:4] for line in lines] == ["ok  "] * 3, lines
    assert f"SupplementaryGroups={group}: group {group} reads the journal" in lines[1]


def test_root_reads_the_journal() -> None:
    root = "LoadState=loaded\nUser=\nGroup=\nSupplementaryGroups=\nDynamicUser=no\n"
    lines = check_journal(FakeReader([entry("postfix/smtp", 1)]), show(root))
    assert lines[1] == "ok   maillog: callahead.service runs with root: root reads the journal"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (None, "systemd or systemctl is not there"),
        ("LoadState=not-found\nUser=\nGroup=\nDynamicUser=no\n", "LoadState=not-found"),
    ],
)
def test_without_systemd_or_the_unit_it_says_it_cannot_tell(answer: str | None, why: str) -> None:
    lines = check_journal(FakeReader([entry("postfix/smtp", 1)]), show(answer))
    assert lines[1].startswith("warn maillog: cannot tell whether callahead.service may read")
    assert why in lines[1]
    assert "SupplementaryGroups=systemd-journal" in lines[2]


def test_no_line_of_postfix_in_a_day_is_a_warning_naming_maillog_file() -> None:
    reader = FakeReader([entry("cron", 10), entry("postfix/smtp", 2 * 86400)])
    lines = check_journal(reader, with_groups("systemd-journal"), {"maillog_file": "/var/log/p"})
    assert lines[2] == (
        "warn maillog: no line of Postfix in the journal's mail facility in the last day"
    )
    assert "main.cf maillog_file = /var/log/p" in lines[3]
    assert "CALLAHEAD_MAILLOG=/var/log/p" in lines[3]
    assert reader.entries == []  # stopped at the old one


def test_a_journal_without_files_fails() -> None:
    lines = check_journal(FakeReader([], files=False), with_groups("systemd-journal"))
    assert lines[0].startswith("FAIL maillog: CALLAHEAD_MAILLOG=journal: the systemd journal has")
    assert len(lines) == 2


# -- a file -----------------------------------------------------------------------


@pytest.fixture
def logdir() -> Iterator[Path]:
    """A directory every user can enter (tmp_path's parents are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="callahead-maillog-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def own_group() -> str:
    return grp.getgrgid(os.getegid()).gr_name


def check_file(path: Path, unit: Any, main: dict[str, str] | None = None) -> list[str]:
    return marks(maillog_findings(str(path), main or {}, unit, syslog_configs=()))


def test_a_file_the_unit_s_group_reads_that_main_cf_names_passes(logdir: Path) -> None:
    log = logdir / "mail.log"
    log.write_text("")
    log.chmod(0o640)
    lines = check_file(log, with_groups(own_group()), {"maillog_file": str(log)})
    assert lines == [
        f"ok   maillog: {log} is a regular file",
        "ok   maillog: callahead.service (a dynamic user, Group=postfix, SupplementaryGroups="
        f"{own_group()}) can read it",
        f"ok   maillog: main.cf maillog_file = {log}: Postfix writes there",
    ]


def test_a_file_the_unit_cannot_read_fails_with_the_group_to_add(logdir: Path) -> None:
    log = logdir / "mail.log"
    log.write_text("")
    log.chmod(0o600)  # its owner only: a dynamic user never owns it
    lines = check_file(log, with_groups(own_group()), {"maillog_file": str(log)})
    assert lines[1].startswith("FAIL maillog: callahead.service (a dynamic user")
    assert f"it cannot read {log} (-rw-------" in lines[1]
    assert "SupplementaryGroups=" in lines[2] and "systemctl edit callahead" in lines[2]


def test_a_directory_the_unit_cannot_enter_fails(logdir: Path) -> None:
    inner = logdir / "closed"
    inner.mkdir(mode=0o700)
    log = inner / "mail.log"
    log.write_text("")
    log.chmod(0o644)
    lines = check_file(log, with_groups(), {"maillog_file": str(log)})
    assert lines[1].startswith("FAIL maillog:")
    assert f"cannot enter {inner}" in lines[1]


def test_without_systemd_the_package_s_unit_is_assumed_and_said(logdir: Path) -> None:
    log = logdir / "mail.log"
    log.write_text("")
    log.chmod(0o600)
    lines = check_file(log, show(None), {"maillog_file": str(log)})
    assert lines[1].startswith("warn maillog: callahead.service (a dynamic user, Group=postfix")
    assert "judged as the package's unit runs: systemd or systemctl is not there" in lines[1]


def test_a_file_yet_to_appear_warns_and_a_missing_directory_fails(logdir: Path) -> None:
    lines = check_file(logdir / "mail.log", with_groups())
    assert lines[0].startswith(f"warn maillog: {logdir}/mail.log does not exist yet")
    lines = check_file(logdir / "none" / "mail.log", with_groups())
    assert lines[0] == f"FAIL maillog: {logdir}/none/mail.log does not exist, nor {logdir}/none"


def test_a_fifo_fails_and_so_does_a_symlink_to_one(logdir: Path) -> None:
    fifo = logdir / "pipe"
    os.mkfifo(fifo)
    lines = check_file(fifo, with_groups())
    assert lines[0].startswith(f"FAIL maillog: {fifo} is a FIFO, not a regular file")
    assert "would block it at open" in lines[0]
    link = logdir / "mail.log"
    link.symlink_to(fifo)
    (line, _fix) = check_file(link, with_groups())
    assert line.startswith(f"FAIL maillog: {link} (a symlink to {fifo}, followed: ")
    assert "is a FIFO" in line


def test_a_symlink_to_a_regular_file_is_followed_and_said(logdir: Path) -> None:
    real = logdir / "mail.log.real"
    real.write_text("")
    real.chmod(0o644)
    link = logdir / "mail.log"
    link.symlink_to(real)
    lines = check_file(link, with_groups(), {"maillog_file": str(real)})
    assert lines[0] == (
        f"ok   maillog: {link} (a symlink to {real}, followed: rotation is seen through it) "
        "is a regular file"
    )
    assert lines[1].startswith("ok   maillog: callahead.service")
    assert lines[2] == f"ok   maillog: main.cf maillog_file = {real}: Postfix writes there"


def test_a_file_every_user_can_write_is_a_warning(logdir: Path) -> None:
    log = logdir / "mail.log"
    log.write_text("")
    log.chmod(0o646)
    lines = check_file(log, with_groups(), {"maillog_file": str(log)})
    assert lines[2].startswith(f"warn maillog: {log} (-rw-r--rw-")
    assert "a forged status=sent teaches the cache" in lines[2]
    assert lines[3] == f"     fix: chmod o-w {log}"


def test_who_writes_the_file_main_cf_elsewhere_a_syslog_config_or_unknown(logdir: Path) -> None:
    log = logdir / "mail.log"
    log.write_text("")
    log.chmod(0o644)
    other = marks(
        maillog_findings(str(log), {"maillog_file": "/var/log/postfix.log"}, with_groups())
    )
    assert other[-2].startswith("warn maillog: main.cf maillog_file = /var/log/postfix.log:")
    assert other[-1] == "     fix: CALLAHEAD_MAILLOG=/var/log/postfix.log"
    conf = logdir / "rsyslog.d"
    conf.mkdir()
    (conf / "50-default.conf").write_text(f"mail.*  -{log}.1\n")
    pattern = str(conf / "*.conf")
    unknown = marks(maillog_findings(str(log), {}, with_groups(), syslog_configs=[pattern]))
    assert unknown[-2].startswith(f"warn maillog: cannot tell that Postfix's lines go to {log}")
    (conf / "50-default.conf").write_text(f"mail.*  -{log}\n")
    named = marks(maillog_findings(str(log), {}, with_groups(), syslog_configs=[pattern]))
    assert named[-1] == (
        f"ok   maillog: {conf}/50-default.conf names it: the syslog daemon writes there"
    )


def test_systemctl_show_is_asked_for_the_unit_s_identity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real runner: a ``systemctl`` script first on PATH, as systemd 252 answers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv = tmp_path / "argv"
    answer = SHIPPED.replace("SupplementaryGroups=", "SupplementaryGroups=systemd-journal")
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\necho "$@" > {argv}\ncat <<END\n{answer}END\n')
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    text = systemctl_show(PROPERTIES, running=str(tmp_path))
    assert argv.read_text().split() == ["show", "callahead.service"] + [
        f"-p{name}" for name in PROPERTIES
    ]
    identity = unit_identity(lambda properties: text)
    assert not isinstance(identity, str)
    assert (identity.dynamic, identity.group) == (True, "postfix")
    assert identity.supplementary == ("systemd-journal",)
    assert systemctl_show(PROPERTIES, running=str(tmp_path / "no-systemd")) is None
