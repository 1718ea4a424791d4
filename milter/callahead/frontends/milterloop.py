"""libmilter's start in two steps, so that callahead says READY=1 only once the milter
socket accepts connections.

pymilter's ``Milter.runmilter`` registers the callbacks, binds and listens
(``milter.opensocket``) and runs libmilter's loop (``milter.main``) in one call that
returns only at the end, so a caller that must report readiness had to do it before the
socket existed: Postfix could connect in that window, be refused, and apply
``milter_default_action = accept`` to the recipients of that session. ``open_milter``
does what ``runmilter`` does up to and including ``opensocket`` (pymilter 1.0.5, the
venv's and Debian's ``python3-milter`` alike); ``run_milter`` is the rest: libmilter's
loop, which takes the socket already open and accepts the connections queued on it
meanwhile.

A ``unix:`` socket is never taken from a process that still answers on it: libmilter's
``opensocket(True)`` unlinks whatever socket is at the path and binds its own, so a
second ``callahead serve`` would take the path from the first, which would run on,
unreachable, once the second exited (and Postfix accept every recipient unverified).
``open_milter`` clears only a stale socket (``unixsocket.clear_stale``, as for the
policy and admin sockets) and has libmilter bind without removing anything, so a live
one is an error, as a TCP port in use is.
"""

from __future__ import annotations

import Milter

from .unixsocket import UnixSocketError, clear_stale

milter = Milter.milter
"""pymilter's C module (``Milter`` imports it as ``milter``)."""


class MilterStartError(Exception):
    """libmilter could not open its socket or start its loop (``milter.error``)."""


def open_milter(name: str, socket: str, timeout: int) -> None:
    """Register ``Milter.factory``'s callbacks under ``name`` and bind and listen on
    ``socket`` (libmilter's form: ``inet:8895@127.0.0.1``, ``unix:/path``), removing a
    stale unix socket first, never one where a process answers. Raises
    ``MilterStartError``."""
    try:
        _clear_stale_unix(socket)
    except UnixSocketError as exc:
        raise MilterStartError(str(exc)) from exc
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)
    try:
        milter.setconn(socket)
        if timeout > 0:
            milter.settimeout(timeout)
        negotiate = Milter.negotiate_callback if milter.getversion() >= (1, 0, 1) else None
        milter.register(
            name,
            data=lambda ctx: ctx.getpriv().data(),
            unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
            negotiate=negotiate,
        )
        # False: libmilter removes nothing, its bind fails on any path still there.
        milter.opensocket(False)
    except milter.error as exc:
        raise MilterStartError(str(exc)) from exc


def _clear_stale_unix(socket: str) -> None:
    """For a ``unix:`` (or ``local:``) socket, remove a stale one at its path; raise
    ``UnixSocketError`` when something answers there, or it is not a socket."""
    kind, _, path = socket.partition(":")
    if kind in ("unix", "local") and path:
        clear_stale(path)


def run_milter() -> None:
    """libmilter's loop on the socket ``open_milter`` opened, until its signal thread
    takes a stop signal. Raises ``MilterStartError`` when libmilter gives up (it cannot
    start, or can no longer make threads)."""
    try:
        milter.main()
    except milter.error as exc:
        raise MilterStartError(str(exc)) from exc
