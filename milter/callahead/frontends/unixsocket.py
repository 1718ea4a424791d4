"""Listening unix sockets that never destroy what is not theirs (the admin socket, the
policy service's ``unix:`` socket).

At start, ``bind_unix`` clears a *stale* socket at the path (a socket file that nothing
listens on: a callahead that died) and binds a new one; it never touches a path that is
not a socket (a regular file, a directory, a symlink) nor a socket where something still
answers, and raises ``UnixSocketError`` saying which. The bind itself never replaces
anything (``bind`` fails on an existing path), unlike asyncio's ``start_unix_server(path=)``,
which unlinks any socket at the path: callers pass the bound socket as ``sock=``.

At stop, ``BoundSocket.remove`` unlinks the path only if it is still the inode this
process bound: a second instance that replaced a socket it found stale keeps its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from ..base.errors import CallaheadError

PROBE_TIMEOUT = 1.0
"""Seconds a connect to an existing socket may take to tell whether something answers."""
BACKLOG = 128
_O_PATH: int = getattr(os, "O_PATH", 0)
"""Linux's O_PATH: a descriptor on the socket file itself (a socket cannot be opened
otherwise)."""


class UnixSocketError(CallaheadError):
    """A unix socket path that cannot be (or must not be) taken; the message says why."""


class BoundSocket:
    """A listening unix socket, and a handle on the inode bound at its path.

    The handle (an ``O_PATH`` descriptor) keeps that inode allocated, so its number
    cannot be given to a file made later at the path (a filesystem reuses the number
    of a deleted file at once): the comparison at ``remove`` is exact."""

    __slots__ = ("_handle", "path", "sock")

    def __init__(self, sock: socket.socket, path: str, handle: int) -> None:
        self.sock = sock
        self.path = path
        self._handle: int | None = handle

    @property
    def inode(self) -> int:
        if self._handle is None:
            raise ValueError("removed already")
        return os.fstat(self._handle).st_ino

    def remove(self) -> bool:
        """Unlink the path if it is still this socket's; True when it was removed.
        Later calls do nothing."""
        handle, self._handle = self._handle, None
        if handle is None:
            return False
        try:
            ours = os.fstat(handle)
            try:
                now = os.lstat(self.path)
            except OSError:
                return False
            if (now.st_dev, now.st_ino) != (ours.st_dev, ours.st_ino):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return True
        finally:
            os.close(handle)


def clear_stale(path: str) -> None:
    """Remove a socket at ``path`` that nothing listens on; raise ``UnixSocketError``
    for anything else there (not a socket, a socket that answers, one that cannot be
    told). Nothing there: nothing to do."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UnixSocketError(f"cannot use {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise UnixSocketError(f"{path} exists and is not a socket; not touching it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            pass  # nobody listens: stale
        except FileNotFoundError:
            return  # gone meanwhile
        except OSError as exc:
            # A full backlog (EAGAIN), a timeout or no permission: it may well be alive.
            raise UnixSocketError(
                f"cannot tell whether something answers on {path} "
                f"({exc.strerror or exc}); not touching it"
            ) from None
        else:
            raise UnixSocketError(f"another process answers on {path}; not touching it")
    # Remove it only if it is still the socket just found dead.
    with contextlib.suppress(FileNotFoundError):
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
            os.unlink(path)


def bind_unix(path: str, mode: int | None = None) -> BoundSocket:
    """A non-blocking unix socket listening on ``path`` (``mode`` applied to the path
    when given), after ``clear_stale``; raises ``UnixSocketError``."""
    clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound: BoundSocket | None = None
    try:
        sock.bind(path)  # EADDRINUSE if anything came back meanwhile: never replaced
        bound = BoundSocket(sock, path, os.open(path, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC))
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if bound is not None:
            bound.remove()
        raise UnixSocketError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return bound
