"""Directories that the tests' unprivileged servers must reach, kept outside the checkout.

A checkout may live anywhere: root's home on Debian is ``/root`` (mode 0700), and
``mktemp -d`` makes 0700 directories too. Exim runs as ``Debian-exim`` and OpenSMTPD's
helpers as ``nobody``: neither can traverse a 0700 directory, so nothing they must
reach (the unpacked MTAs) may live under the checkout. This module makes such
directories under ``SERVER_ROOT`` (``/var/cache/callahead-tests``), every one of them
root-owned, 0755, not a symlink and writable by root alone, so that the servers can read
them and no local user can plant anything there. What it keeps is a cache: the same
Debian packages for every checkout on the machine, fetched under a lock.

Per-test work directories (a Postfix queue, a maildir) are made elsewhere, fresh for
each test, under ``/tmp`` (``tests.harness.fixtures.make_workdir``).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

SERVER_ROOT = Path("/var/cache/callahead-tests")


class ServerDirError(RuntimeError):
    """A directory for the tests' servers is not safe to use (owner, mode, symlink)."""


def _check_safe(directory: Path) -> None:
    """``directory`` (which exists) is a real directory, owned by root, that only root
    can write and everyone can traverse."""
    info = directory.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise ServerDirError(f"{directory} is not a directory (a symlink?); remove it")
    if info.st_uid != 0:
        raise ServerDirError(f"{directory} is owned by uid {info.st_uid}, not root; remove it")
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ServerDirError(
            f"{directory} (mode {stat.filemode(info.st_mode)}) is writable by others than "
            "root; remove it"
        )
    if mode & 0o555 != 0o555:
        directory.chmod(mode | 0o555)


def server_dir(*parts: str, root: Path = SERVER_ROOT) -> Path:
    """``root/parts...``, made as needed (0755, root's) and checked: ``root`` and every
    directory below it on the way is safe (``_check_safe``), and every one above it is
    traversable by everyone. The servers reach it whatever the checkout's modes are."""
    if os.geteuid() != 0:
        raise ServerDirError("the tests' server directories are made as root")
    for above in reversed(root.parents):
        if not above.stat().st_mode & stat.S_IXOTH:
            raise ServerDirError(f"{above} is not traversable by other users")
    current = root
    for part in ("", *parts):
        current = current / part if part else current
        with contextlib.suppress(FileExistsError):
            current.mkdir(mode=0o755)
        _check_safe(current)
    return current
