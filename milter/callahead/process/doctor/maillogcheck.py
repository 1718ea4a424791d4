"""``callahead doctor``'s ``maillog`` item: whether the backscatter meter
(``CALLAHEAD_MAILLOG``) will read Postfix's mail log once ``serve`` runs.

doctor runs as root, the unit does not (the package's: a dynamic user in group
``postfix``), so what the unit may read is reasoned from how it runs (unitidentity.py,
``systemctl show``) and from modes, owners and groups, not tried with access(2); ACLs are
not read.

- empty: the meter is off (does not apply);
- ``journal``: python3-systemd imports, the journal has files, the unit's groups include
  ``systemd-journal`` or ``adm`` (without one, journald's files are closed to it and the
  meter stays off), and Postfix's lines are there (a warning when none came in a day);
- a file: it exists (not yet, in an existing directory: a warning, the meter waits for
  it), it is a regular file once symlinks are followed (the meter opens it, seeks to its
  end and watches its inode and size for rotation: a FIFO would block it at open, a
  device or a directory has no lines to follow), the unit can enter its directories and
  read it, no other local user can write it (forged lines would teach the cache), and
  Postfix writes there: main.cf ``maillog_file``, or a syslog daemon's configuration
  naming it (a light heuristic: a warning, never a failure, when it cannot tell).
"""

from __future__ import annotations

import datetime
import glob
import grp
import importlib
import os
import pwd
import re
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any

from ..socketaccess import enter_problem, permits
from .postfixhooks import Finding
from .unitidentity import SHIPPED, UNIT, ShowRunner, UnitIdentity, systemctl_show, unit_identity

ITEM = "maillog"
JOURNAL_GROUPS = frozenset({"systemd-journal", "adm"})
"""Groups that read the system journal's files (adm through Debian's ACL)."""
DROPIN_FIX = (
    "systemctl edit callahead, then [Service] SupplementaryGroups={group}, "
    "and systemctl restart callahead"
)
MAIL_FACILITY = "2"
LOOK_BACK = 86400.0
"""Seconds back that the journal is searched for a line of Postfix."""
LOOK_LIMIT = 20000
"""Journal entries looked at, at most, for one."""
SYSLOG_CONFIGS = (
    "/etc/rsyslog.conf",
    "/etc/rsyslog.d/*.conf",
    "/etc/syslog-ng/syslog-ng.conf",
    "/etc/syslog-ng/conf.d/*.conf",
    "/etc/syslog.conf",
)
CONFIG_LIMIT = 1 << 20
"""Bytes of a syslog configuration file read, at most."""
WHERE_FIX = (
    "point CALLAHEAD_MAILLOG at the file Postfix's lines go to (main.cf maillog_file, or "
    "the syslog daemon's mail.* file), or use CALLAHEAD_MAILLOG=journal"
)


def _journal_module() -> Any:
    return importlib.import_module("systemd.journal")


def maillog_findings(
    setting: str,
    main: Mapping[str, str],
    show: ShowRunner = systemctl_show,
    journal: Callable[[], Any] = _journal_module,
    syslog_configs: Sequence[str] = SYSLOG_CONFIGS,
    now: Callable[[], float] = time.time,
) -> list[Finding]:
    """The ``maillog`` item for ``CALLAHEAD_MAILLOG=setting``, Postfix's ``main``
    settings (``maillog_file``), the unit as ``show`` tells it."""
    if not setting:
        return [
            Finding(
                ITEM,
                None,
                "CALLAHEAD_MAILLOG is empty: the backscatter meter is off "
                "(CALLAHEAD_MAILLOG=journal or the mail log's path turns it on)",
            )
        ]
    if setting == "journal":
        return journal_findings(main, show, journal, now)
    return file_findings(setting, main, show, syslog_configs)


# -- the journal ----------------------------------------------------------------------


def journal_findings(
    main: Mapping[str, str], show: ShowRunner, journal: Callable[[], Any], now: Callable[[], float]
) -> list[Finding]:
    try:
        module = journal()
    except ImportError as exc:
        return [
            Finding(
                ITEM,
                False,
                f"CALLAHEAD_MAILLOG=journal: python3-systemd does not import ({exc}): "
                "the meter stays off",
                "apt install python3-systemd",
            )
        ]
    try:
        reader = module.Reader()
    except OSError as exc:
        return [Finding(ITEM, False, f"cannot open the systemd journal: {exc}", "")]
    try:
        if not (reader.has_runtime_files() or reader.has_persistent_files()):
            return [
                Finding(
                    ITEM,
                    False,
                    "CALLAHEAD_MAILLOG=journal: the systemd journal has no file, even for "
                    "root: the meter reads nothing",
                    "start systemd-journald (systemctl start systemd-journald)",
                )
            ]
        return [
            Finding(ITEM, True, "CALLAHEAD_MAILLOG=journal: python3-systemd imports"),
            journal_group(unit_identity(show)),
            postfix_in_journal(reader, main, now()),
        ]
    finally:
        reader.close()


def journal_group(identity: UnitIdentity | str) -> Finding:
    """Whether the unit's process may read the journal's files."""
    fix = DROPIN_FIX.format(group="systemd-journal")
    if isinstance(identity, str):
        return Finding(
            ITEM,
            True,
            f"cannot tell whether {UNIT} may read the journal: {identity}",
            f"make sure it runs in the systemd-journal group: {fix}",
            warn=True,
        )
    groups = sorted(identity.group_names() & JOURNAL_GROUPS)
    if identity.root or groups:
        why = "root" if identity.root else f"group {' and '.join(groups)}"
        return Finding(ITEM, True, f"{UNIT} runs with {identity}: {why} reads the journal")
    return Finding(
        ITEM,
        False,
        f"{UNIT} runs with {identity}: in neither the systemd-journal nor the adm group, it "
        "can read no journal file, and the meter stays off",
        fix,
    )


def postfix_in_journal(reader: Any, main: Mapping[str, str], now: float) -> Finding:
    """A line of Postfix (``SYSLOG_IDENTIFIER`` ``postfix/...``) in the mail facility
    within ``LOOK_BACK`` seconds, looked for backwards from the journal's end."""
    reader.add_match(SYSLOG_FACILITY=MAIL_FACILITY)
    reader.seek_tail()
    for _ in range(LOOK_LIMIT):
        entry = reader.get_previous()
        if not entry:
            break
        when = entry.get("__REALTIME_TIMESTAMP")
        age = now - when.timestamp() if isinstance(when, datetime.datetime) else 0.0
        if age > LOOK_BACK:
            break
        program = entry.get("SYSLOG_IDENTIFIER")
        if isinstance(program, str) and program.startswith("postfix"):
            return Finding(
                ITEM,
                True,
                f"Postfix's lines are in the journal ({program}, {age / 60:.0f} min ago)",
            )
    maillog_file = main.get("maillog_file", "").strip()
    fix = (
        "check that Postfix logs to syslog with syslog_facility = mail (journalctl -t postfix/smtp)"
    )
    if maillog_file:
        fix = (
            f"main.cf maillog_file = {maillog_file}: Postfix writes its log there, not to "
            f"syslog: CALLAHEAD_MAILLOG={maillog_file}"
        )
    return Finding(
        ITEM,
        True,
        "no line of Postfix in the journal's mail facility in the last day",
        fix,
        warn=True,
    )


# -- a file ---------------------------------------------------------------------------


def file_findings(
    path: str, main: Mapping[str, str], show: ShowRunner, syslog_configs: Sequence[str]
) -> list[Finding]:
    writer = who_writes(path, main, syslog_configs)
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if os.path.isdir(parent):
            missing = Finding(
                ITEM,
                True,
                f"{path} does not exist yet: the meter looks for it every second and reads "
                "it from its start when it appears",
                WHERE_FIX,
                warn=True,
            )
        else:
            missing = Finding(ITEM, False, f"{path} does not exist, nor {parent}", WHERE_FIX)
        return [missing, writer]
    except OSError as exc:
        return [Finding(ITEM, False, f"cannot check {path}: {exc.strerror or exc}", WHERE_FIX)]
    target = os.path.realpath(path)
    via = (
        f" (a symlink to {target}, followed: rotation is seen through it)"
        if stat.S_ISLNK(link.st_mode)
        else ""
    )
    try:
        info = os.stat(path)
    except OSError as exc:
        return [Finding(ITEM, False, f"{path}{via}: {exc.strerror or exc}", WHERE_FIX)]
    if not stat.S_ISREG(info.st_mode):
        return [
            Finding(
                ITEM,
                False,
                f"{path}{via} is {_kind(info.st_mode)}, not a regular file: the meter opens "
                "it, reads from its end and watches its inode and size for rotation (a FIFO "
                "would block it at open, a device or a directory has no lines to follow)",
                WHERE_FIX,
            )
        ]
    return [
        Finding(ITEM, True, f"{path}{via} is a regular file"),
        readable(path, target, info, unit_identity(show)),
        *forgeable(target, info),
        writer,
    ]


def _kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a directory",
        stat.S_ISFIFO: "a FIFO",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "not a file")


def _owner(info: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        user = str(info.st_uid)
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = str(info.st_gid)
    return f"{stat.filemode(info.st_mode)} {user}:{group}"


def readable(path: str, target: str, info: os.stat_result, identity: UnitIdentity | str) -> Finding:
    """Whether the unit's process may enter the directories above ``path`` (and the
    symlink's ``target``) and read the file: by its owner, group and other bits."""
    unsure = ""
    if isinstance(identity, str):
        unsure = f" (judged as the package's unit runs: {identity})"
        identity = SHIPPED
    who = identity.account()
    problem = enter_problem(PurePosixPath(path), who) or enter_problem(PurePosixPath(target), who)
    if problem is None and not permits(info.st_mode, info.st_uid, info.st_gid, who, 4):
        problem = f"it cannot read {target} ({_owner(info)})"
    if problem is None:
        return Finding(ITEM, True, f"{UNIT} ({identity}) can read it{unsure}")
    group = _owner(info).split(":")[-1]
    fix = (
        DROPIN_FIX.format(group=group)
        if info.st_gid != 0
        else "give the file a group that may read it (chgrp adm, chmod g+r, and the same for "
        "the files the syslog daemon creates: rsyslog's $FileGroup adm), then "
        + DROPIN_FIX.format(group="adm")
    )
    return Finding(
        ITEM,
        bool(unsure),
        f"{UNIT} ({identity}): {problem}, so the meter reads nothing{unsure}",
        fix,
        warn=bool(unsure),
    )


def forgeable(target: str, info: os.stat_result) -> list[Finding]:
    """A warning when a local user who is not root can write the file, or replace it."""
    parent = os.stat(os.path.dirname(target))
    if info.st_mode & stat.S_IWOTH:
        why = f"{target} ({_owner(info)}) is writable by every local user"
    elif parent.st_mode & stat.S_IWOTH and not parent.st_mode & stat.S_ISVTX:
        why = f"its directory ({_owner(parent)}) lets every local user replace it"
    else:
        return []
    return [
        Finding(
            ITEM,
            True,
            f"{why}: forged lines would count as fates, and a forged status=sent teaches the cache",
            f"chmod o-w {target if info.st_mode & stat.S_IWOTH else os.path.dirname(target)}",
            warn=True,
        )
    ]


def who_writes(path: str, main: Mapping[str, str], syslog_configs: Sequence[str]) -> Finding:
    """Whether Postfix's lines go to ``path``: main.cf ``maillog_file``, else a syslog
    daemon's configuration that names it. A warning when it cannot tell."""
    same = {path, os.path.realpath(path)}
    maillog_file = main.get("maillog_file", "").strip()
    if maillog_file and (maillog_file in same or os.path.realpath(maillog_file) in same):
        return Finding(ITEM, True, f"main.cf maillog_file = {maillog_file}: Postfix writes there")
    if maillog_file:
        return Finding(
            ITEM,
            True,
            f"main.cf maillog_file = {maillog_file}: Postfix writes its log there, not to "
            f"syslog and {path}",
            f"CALLAHEAD_MAILLOG={maillog_file}",
            warn=True,
        )
    names = re.compile("|".join(re.escape(p) for p in sorted(same)) + r"(?![\w./-])")
    for pattern in syslog_configs:
        for config in sorted(glob.glob(pattern)):
            try:
                with open(config, encoding="utf-8", errors="replace") as handle:
                    text = handle.read(CONFIG_LIMIT)
            except OSError:
                continue
            if names.search(text):
                return Finding(ITEM, True, f"{config} names it: the syslog daemon writes there")
    return Finding(
        ITEM,
        True,
        f"cannot tell that Postfix's lines go to {path}: main.cf has no maillog_file, and no "
        "syslog configuration names it",
        WHERE_FIX,
        warn=True,
    )
