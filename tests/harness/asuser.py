"""What another local user can do with a unix socket, tried for real: a forked child
takes that user's uid and one group and connects, binds or removes it. Forked, not run: the
test's interpreter may live where that user cannot reach it (a checkout in /root)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

ALLOWED = 0
"""The child's exit status when what it tried worked."""


def as_user(uid: int, gid: int, path: Path, action: str = "connect") -> int:
    """0 when a process of ``uid`` with ``gid`` as its only group can ``action`` the
    unix socket ``path`` (``connect`` to it, ``bind`` a socket of its own there, or
    ``unlink`` it), else the errno it got (``errno.EACCES`` when refused by a
    permission); needs root."""
    if action not in ("connect", "bind", "unlink"):
        raise ValueError(action)
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 255
        try:
            os.setgroups([gid])
            os.setgid(gid)
            os.setuid(uid)
            if action == "unlink":
                os.unlink(path)
            else:
                with socket.socket(socket.AF_UNIX) as sock:
                    getattr(sock, action)(str(path))
            code = ALLOWED
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
