"""Whether Postfix will be able to connect to callahead's unix sockets, told at start.

A unix socket gets its owner and group from the process that binds it (its effective
uid and *primary* gid, or the directory's group when the directory is set-group-ID) and
its mode from the umask: ``SupplementaryGroups=postfix`` does not make a socket the
postfix group's. smtpd (user ``postfix``) then gets "Permission denied" at connect, and
with ``milter_default_action = accept`` mail flows unverified without a word. So before
anything listens, ``serve`` works out what the socket will be (libmilter binds the milter
socket itself, with no chmod) and whether the ``postfix`` user can reach it: search
permission on every directory above it and write permission on the socket, by the owner,
group or other bits that apply to that user and its groups, as the kernel decides. A
socket Postfix cannot use is a configuration error (exit 78), not a log line nobody
reads while mail goes through unverified.

On a host without a ``postfix`` user there is nothing to check. ACLs are not read: a
socket they would open to Postfix is reported all the same (give the directory the
postfix group instead).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import stat
from dataclasses import dataclass
from pathlib import PurePosixPath

from .config import Config

POSTFIX_USER = "postfix"
CONNECT_TIMEOUT = 5.0
"""Seconds ``callahead doctor`` gives a connect to callahead's own socket."""


@dataclass(frozen=True)
class Account:
    """A user as permission checks see it."""

    name: str
    uid: int
    gids: frozenset[int]


def account(name: str = POSTFIX_USER) -> Account | None:
    """``name`` with its primary and supplementary groups; None if there is no such user."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    gids = {entry.pw_gid}
    with contextlib.suppress(OSError):
        gids.update(os.getgrouplist(name, entry.pw_gid))
    return Account(name, entry.pw_uid, frozenset(gids))


def permits(mode: int, uid: int, gid: int, who: Account, want: int) -> bool:
    """Whether ``who`` has the ``want`` bits (4 read, 2 write, 1 search) on a file of
    ``mode`` owned by ``uid``:``gid``: the owner's bits if it owns it, else the group's
    if it is in the group, else the others' (only one class applies)."""
    if who.uid == 0:
        return True
    if who.uid == uid:
        bits = (mode >> 6) & 7
    elif gid in who.gids:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def current_umask() -> int:
    """This process's umask, read without changing it (Linux's /proc/self/status)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _stat(path: str) -> os.stat_result | str:
    """``path``'s status, or why it cannot be had."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"cannot check {path}: {exc.strerror or exc}"


def enter_problem(socket_path: PurePosixPath, who: Account) -> str | None:
    """Why ``who`` could not enter every directory above ``socket_path``; None when
    it can."""
    for directory in reversed(socket_path.parents):
        info = _stat(str(directory))
        if isinstance(info, str):
            return info
        if not permits(info.st_mode, info.st_uid, info.st_gid, who, 1):
            return (
                f"{who.name} cannot enter {directory} (mode {stat.filemode(info.st_mode)}, "
                f"group {_group_name(info.st_gid)})"
            )
    return None


def reach_problem(path: str, who: Account, umask: int | None = None) -> str | None:
    """Why ``who`` could not connect to a unix socket that this process binds at
    ``path`` (an existing socket there is replaced), or None when it could."""
    socket_path = PurePosixPath(path)
    entry = enter_problem(socket_path, who)
    if entry is not None:
        return entry
    parent = os.stat(socket_path.parent)
    gid = parent.st_gid if parent.st_mode & stat.S_ISGID else os.getegid()
    mode = 0o777 & ~(current_umask() if umask is None else umask)
    if not permits(mode, os.geteuid(), gid, who, 2):
        return (
            f"the socket would be {stat.filemode(stat.S_IFSOCK | mode)} group "
            f"{_group_name(gid)}, which {who.name} cannot write to: run callahead with "
            f"the postfix group as its primary group (the unit's Group=postfix) and "
            f"UMask=0007"
        )
    return None


def socket_paths(config: Config) -> list[tuple[str, str]]:
    """(variable, path) of each unix socket Postfix connects to."""
    paths: list[tuple[str, str]] = []
    if config.socket:
        milter = config.milter_socket
        if milter.startswith(("unix:", "local:")):
            paths.append(("CALLAHEAD_SOCKET", milter.split(":", 1)[1]))
    listen = config.policy_listen
    if listen is not None and listen.kind == "unix":
        paths.append(("CALLAHEAD_POLICY_LISTEN", listen.path))
    return paths


def postfix_socket_problems(config: Config, who: Account | None = None) -> list[str]:
    """One line per unix socket of ``config`` that Postfix's ``postfix`` user (or
    ``who``) could not connect to; none on a host without that user."""
    user = account() if who is None else who
    if user is None:
        return []
    problems = []
    for variable, path in socket_paths(config):
        problem = reach_problem(path, user)
        if problem is not None:
            problems.append(f"{variable}=unix:{path}: Postfix could not connect: {problem}")
    return problems


# -- an existing socket, as callahead doctor checks it ------------------------------


def _connect(path: str) -> str | None:
    """Why this process cannot connect to the unix socket ``path``; None when it can."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(path)
        except OSError as exc:
            return str(exc.strerror or exc)
    return None


def _connects(path: str, who: Account | None) -> str | None:
    """Why ``who`` (this process when None or not root) cannot connect to the unix
    socket ``path``; None when it can. As root, the connect runs as ``who``, in a
    forked child (not a new interpreter, which may live where ``who`` cannot reach:
    a virtualenv in /root)."""
    if who is None or os.geteuid() != 0 or who.uid == 0:
        return _connect(path)
    gid = pwd.getpwuid(who.uid).pw_gid
    readable, writable = os.pipe()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(readable)
        os.close(writable)
        return f"could not try as {who.name}: {exc.strerror or exc}"
    if pid == 0:  # pragma: no cover (the child: says why, or nothing, and exits)
        why = "could not become the user"
        try:
            os.close(readable)
            os.setgroups(sorted(who.gids))
            os.setgid(gid)
            os.setuid(who.uid)
            why = _connect(path) or ""
        except BaseException as exc:  # noqa: BLE001 (reported to the parent)
            why = f"{why}: {exc}"
        finally:
            os.write(writable, why.encode(errors="replace"))
            os._exit(0)
    os.close(writable)
    with os.fdopen(readable, "rb") as answer:
        why = answer.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return why or None


def unix_reach(path: str, who: Account | None) -> str | None:
    """Why ``who`` could not use the socket at ``path`` now; None when it can."""
    info = _stat(path)
    if isinstance(info, str):
        return info
    if not stat.S_ISSOCK(info.st_mode):
        return f"{path} is not a socket"
    if who is not None:
        entry = enter_problem(PurePosixPath(path), who)
        if entry is not None:
            return entry
        if not permits(info.st_mode, info.st_uid, info.st_gid, who, 2):
            return (
                f"{who.name} cannot write to {path} "
                f"({stat.filemode(info.st_mode)}, uid {info.st_uid}, gid {info.st_gid})"
            )
    refused = _connects(path, who)
    return None if refused is None else f"connect to {path}: {refused}"


OTHERS = Account("every local user", -1, frozenset())
"""A user who is neither the owner nor in the group of any file checked: whom the
"other" permission bits let in."""


def _describe(path: str, info: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = str(info.st_uid)
    return f"{path} ({stat.filemode(info.st_mode)} {owner}:{_group_name(info.st_gid)})"


def local_exposure(path: str) -> tuple[bool, str]:
    """Whether every local user (not root, not an owner, not in a group of the socket
    or of a directory above it) could connect to the unix socket at ``path`` or put one
    of their own in its place, and why: (True, what they could do), or (False, what
    keeps them out)."""
    socket_path = PurePosixPath(path)
    for directory in reversed(socket_path.parents):
        info = _stat(str(directory))
        if isinstance(info, str):
            return False, info
        if not permits(info.st_mode, info.st_uid, info.st_gid, OTHERS, 1):
            return False, f"{_describe(str(directory), info)} keeps every other local user out"
    parent = os.stat(socket_path.parent)
    if permits(parent.st_mode, parent.st_uid, parent.st_gid, OTHERS, 3) and not (
        parent.st_mode & stat.S_ISVTX
    ):
        where = _describe(str(socket_path.parent), parent)
        return True, (
            f"every local user can enter and write to {where}, and so remove the socket "
            "and listen there in callahead's place"
        )
    info = _stat(path)
    if isinstance(info, str):
        return False, info
    if permits(info.st_mode, info.st_uid, info.st_gid, OTHERS, 2):
        return True, f"every local user can connect to {_describe(path, info)}"
    return False, f"the socket {_describe(path, info)} lets no other local user connect"


def inet_reach(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return None
    except OSError as exc:
        return f"connect to {host}:{port}: {exc.strerror or exc}"
