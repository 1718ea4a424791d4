"""Who ``callahead.service`` runs as, for ``callahead doctor``, which runs as root: its
``User=``, ``Group=``, ``SupplementaryGroups=`` and ``DynamicUser=``, read with
``systemctl show`` (drop-ins included), and the groups that gives the process. A dynamic
user belongs to no group but the unit's own; a static user has its groups from the
group database too; no ``User=`` without ``DynamicUser=`` is root."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..socketaccess import Account

UNIT = "callahead.service"
SYSTEMD_RUNNING = "/run/systemd/system"
SYSTEMCTL_TIMEOUT = 5.0
PROPERTIES = ("LoadState", "User", "Group", "SupplementaryGroups", "DynamicUser")

ShowRunner = Callable[[Sequence[str]], "str | None"]
"""``systemctl show UNIT -p NAME ...``'s output for these property names; None when
systemd does not run, systemctl is missing or fails."""


def systemctl_show(properties: Sequence[str], running: str = SYSTEMD_RUNNING) -> str | None:
    systemctl = shutil.which("systemctl")
    if not os.path.isdir(running) or systemctl is None:
        return None
    argv = [systemctl, "show", UNIT, *(f"-p{name}" for name in properties)]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


@dataclass(frozen=True)
class UnitIdentity:
    user: str
    """``User=``; empty: root, or a dynamic user named after the unit."""
    dynamic: bool
    group: str
    supplementary: tuple[str, ...]

    @property
    def root(self) -> bool:
        return not self.dynamic and self.user in ("", "root")

    def group_names(self) -> set[str]:
        names = {self.group, *self.supplementary} - {""}
        if self.root:
            names.add("root")
        with contextlib.suppress(KeyError, OSError):
            if self.user and not self.root:
                entry = pwd.getpwnam(self.user)
                names.update(_name(g) for g in os.getgrouplist(self.user, entry.pw_gid))
        return names

    def account(self) -> Account:
        """As permission checks see it (a dynamic user owns no file: uid -1)."""
        uid = 0 if self.root else -1
        with contextlib.suppress(KeyError):
            if self.user and not self.root:
                uid = pwd.getpwnam(self.user).pw_uid
        gids = set()
        for name in self.group_names():
            with contextlib.suppress(KeyError):
                gids.add(grp.getgrnam(name).gr_gid)
        return Account(self.user or ("root" if self.root else "callahead"), uid, frozenset(gids))

    def __str__(self) -> str:
        who = "root" if self.root else (f"User={self.user}" if self.user else "a dynamic user")
        if self.dynamic and self.user:
            who = f"DynamicUser=yes User={self.user}"
        groups = f", Group={self.group}" if self.group else ""
        extra = " ".join(self.supplementary)
        if self.root and not extra:
            return f"{who}{groups}"
        return f"{who}{groups}, SupplementaryGroups={extra or '(none)'}"


SHIPPED = UnitIdentity("", True, "postfix", ())
"""The package's unit without a drop-in."""


def _name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def unit_identity(show: ShowRunner = systemctl_show) -> UnitIdentity | str:
    """The unit's identity, or why it cannot be told."""
    text = show(PROPERTIES)
    if text is None:
        return f"systemd or systemctl is not there to show {UNIT}"
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip()
    if values.get("LoadState", "loaded") != "loaded":
        return f"systemd has no {UNIT} (LoadState={values['LoadState']})"
    return UnitIdentity(
        values.get("User", ""),
        values.get("DynamicUser", "no") == "yes",
        values.get("Group", ""),
        tuple(values.get("SupplementaryGroups", "").split()),
    )
