"""Stand-in primary MX servers for tests and demos.

``Primary`` is a real SMTP server (aiosmtpd, TCP on 127.0.0.1) that knows a set of users:
``RCPT TO`` a known user gets ``250 2.1.5 OK``, anything else the reply a Postfix primary
gives (``550 5.1.1 ... User unknown in virtual mailbox table``). It records every
connection, ``MAIL FROM``, ``RCPT TO`` decision and delivered message, so a test can check
that a probe really reached the primary and what it was told.

``SilentServer`` accepts TCP connections and never sends a byte: a primary that hangs.

Both are ``tests.harness.threaded.ThreadedServer``s: they run their own asyncio loop in
their own thread, can be stopped and started again on the same port any number of times,
and close every connection when stopped, so that connecting afterwards is refused.

``python -m tests.harness.primary --port N --user a@example.com`` runs a ``Primary`` in
the foreground until SIGTERM/SIGINT and prints one line per RCPT decision and per
delivered message.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import FrameType

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.harness.threaded import HOST, ThreadedServer

__all__ = [
    "Delivered",
    "Primary",
    "RcptRecord",
    "SilentServer",
    "main",
]

RCPT_OK = "250 2.1.5 OK"
MAIL_OK = "250 2.1.0 OK"
DATA_OK = "250 2.0.0 OK: queued"
NULL_SENDER_REJECT = "550 5.7.1 null sender not accepted"


def unknown_user_reply(address: str) -> str:
    """The reply a Postfix primary gives for a user it does not know."""
    return (
        f"550 5.1.1 <{address}>: Recipient address rejected: User unknown in virtual mailbox table"
    )


@dataclass(frozen=True)
class RcptRecord:
    """One ``RCPT TO`` the primary answered. ``sender`` is ``""`` for a null sender."""

    sender: str
    address: str
    code: int


@dataclass(frozen=True)
class Delivered:
    """One message whose DATA completed. ``data`` is the message as received."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


class _SMTPProtocol(SMTP):
    """aiosmtpd's SMTP protocol, reporting connections to its owner."""

    def __init__(self, owner: ThreadedServer, handler: _PrimaryHandler, hostname: str) -> None:
        super().__init__(
            handler,
            hostname=hostname,
            enable_SMTPUTF8=True,
            loop=asyncio.get_running_loop(),
        )
        self._owner = owner
        self._tracked: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._tracked is None:  # not a STARTTLS upgrade
            self._tracked = transport
            self._owner._connection_made(transport)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._owner._connection_lost(self._tracked)
        super().connection_lost(error)


def _sender(address: str) -> str:
    """aiosmtpd hands the null sender over as ``<>``; we record it as ``""``."""
    return "" if address in ("<>", "") else address


class _PrimaryHandler:
    """aiosmtpd handler hooks; runs in the loop thread."""

    def __init__(self, primary: Primary) -> None:
        self._primary = primary

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        sender = _sender(address)
        reply = self._primary._mail_from(sender)
        if reply.startswith("2"):
            # aiosmtpd needs a truthy mail_from for RCPT to be allowed: keep "<>".
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        sender = _sender(envelope.mail_from or "")
        reply, delay = self._primary._rcpt_decision(address)
        if delay > 0:
            await asyncio.sleep(delay)
        self._primary._record_rcpt(RcptRecord(sender, address, int(reply[:3])), reply)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        self._primary._record_message(
            Delivered(_sender(envelope.mail_from or ""), tuple(envelope.rcpt_tos), data)
        )
        return DATA_OK


class Primary(ThreadedServer):
    """A primary MX that knows ``users`` (compared case-insensitively, whole address).

    Replies: RCPT for a known user ``250 2.1.5 OK``; for anyone else
    ``550 5.1.1 <addr>: Recipient address rejected: User unknown in virtual mailbox
    table``; postmaster@ is one of them only with ``postmaster`` (the default is the
    unkind common case: many real primaries have no such mailbox); with
    ``reject_null_sender`` ``MAIL FROM:<>`` gets
    ``550 5.7.1 null sender not accepted``. ``set_rcpt_reply`` overrides the reply
    (and can delay it) for one address, e.g. ``451 4.3.0 try again later``.

    ``log``, if given, is called (from the server thread) with one line per RCPT
    decision and per delivered message.
    """

    _kind = "primary"

    def __init__(
        self,
        users: Iterable[str],
        *,
        port: int | None = None,
        hostname: str = "primary.test",
        reject_null_sender: bool = False,
        log: Callable[[str], None] | None = None,
        host: str = HOST,
        postmaster: bool = False,
    ) -> None:
        super().__init__(port, host)
        self._hostname = hostname
        self.postmaster = postmaster
        self.reject_null_sender = reject_null_sender
        self._log = log
        self._lock = threading.Lock()
        self._users: set[str] = {u.lower() for u in users}
        self._overrides: dict[str, tuple[str, float]] = {}
        self._mail_froms: list[str] = []
        self._rcpts: list[RcptRecord] = []
        self._messages: list[Delivered] = []
        self._handler = _PrimaryHandler(self)

    @property
    def hostname(self) -> str:
        return self._hostname

    def _make_protocol(self) -> asyncio.BaseProtocol:
        return _SMTPProtocol(self, self._handler, self._hostname)

    # -- users -----------------------------------------------------------------------

    @property
    def users(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._users)

    def add_user(self, addr: str) -> None:
        with self._lock:
            self._users.add(addr.lower())

    def remove_user(self, addr: str) -> None:
        with self._lock:
            self._users.discard(addr.lower())

    def set_rcpt_reply(self, addr: str, reply: str | None, *, delay: float = 0.0) -> None:
        """Answer RCPT for ``addr`` with ``reply`` (a full ``"451 4.3.0 text"`` line)
        after ``delay`` seconds, instead of the users-based answer.
        ``reply=None`` removes the override."""
        with self._lock:
            if reply is None:
                self._overrides.pop(addr.lower(), None)
            else:
                if not (len(reply) >= 3 and reply[:3].isdigit()):
                    raise ValueError(f"reply must start with a 3-digit code: {reply!r}")
                self._overrides[addr.lower()] = (reply, delay)

    # -- decisions (loop thread) -------------------------------------------------------

    def _mail_from(self, sender: str) -> str:
        with self._lock:
            self._mail_froms.append(sender)
        if sender == "" and self.reject_null_sender:
            return NULL_SENDER_REJECT
        return MAIL_OK

    def _rcpt_decision(self, address: str) -> tuple[str, float]:
        key = address.lower()
        with self._lock:
            if key in self._overrides:
                return self._overrides[key]
            known = key in self._users or (self.postmaster and key.startswith("postmaster@"))
        return (RCPT_OK if known else unknown_user_reply(address)), 0.0

    def _record_rcpt(self, record: RcptRecord, reply: str) -> None:
        with self._lock:
            self._rcpts.append(record)
        if self._log is not None:
            self._log(f"RCPT from=<{record.sender}> to=<{record.address}> -> {reply}")

    def _record_message(self, message: Delivered) -> None:
        with self._lock:
            self._messages.append(message)
        if self._log is not None:
            self._log(
                f"DELIVERED from=<{message.sender}> to=<{','.join(message.recipients)}> "
                f"bytes={len(message.data)}"
            )

    # -- records -----------------------------------------------------------------------

    @property
    def mail_froms(self) -> list[str]:
        """Every MAIL FROM address as received (``""`` for the null sender)."""
        with self._lock:
            return list(self._mail_froms)

    @property
    def rcpts(self) -> list[RcptRecord]:
        with self._lock:
            return list(self._rcpts)

    @property
    def messages(self) -> list[Delivered]:
        with self._lock:
            return list(self._messages)

    def mailbox(self, addr: str) -> list[bytes]:
        """The messages delivered to ``addr`` (case-insensitive), oldest first."""
        key = addr.lower()
        with self._lock:
            return [m.data for m in self._messages if any(r.lower() == key for r in m.recipients)]

    def probes_for(self, addr: str) -> int:
        """How many RCPT TO ``addr`` arrived with the null sender (the call-ahead
        probes), whatever the answer."""
        key = addr.lower()
        with self._lock:
            return sum(1 for r in self._rcpts if r.sender == "" and r.address.lower() == key)

    def clear_records(self) -> None:
        """Forget recorded MAIL FROMs, RCPTs and messages (not the connection count)."""
        with self._lock:
            self._mail_froms.clear()
            self._rcpts.clear()
            self._messages.clear()


class _SilentProtocol(asyncio.Protocol):
    def __init__(self, owner: ThreadedServer) -> None:
        self._owner = owner
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._owner._connection_made(transport)

    def data_received(self, data: bytes) -> None:
        pass  # swallow everything, answer nothing

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._connection_lost(self._transport)


class SilentServer(ThreadedServer):
    """Accepts TCP connections on 127.0.0.1:``port`` and never sends anything."""

    _kind = "silent-server"

    def __init__(self, *, port: int | None = None) -> None:
        super().__init__(port)

    def _make_protocol(self) -> asyncio.BaseProtocol:
        return _SilentProtocol(self)


def main(argv: list[str] | None = None) -> int:
    """Run a ``Primary`` in the foreground until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.primary",
        description="A stand-in primary MX on 127.0.0.1 that knows the given users.",
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    parser.add_argument(
        "--user", action="append", default=[], metavar="ADDR", help="a known user (repeat)"
    )
    parser.add_argument("--hostname", default="primary.test", help="greeting hostname")
    parser.add_argument(
        "--reject-null-sender", action="store_true", help="answer MAIL FROM:<> with 550"
    )
    args = parser.parse_args(argv)

    print_lock = threading.Lock()

    def emit(line: str) -> None:
        with print_lock:
            print(line, flush=True)

    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    primary = Primary(
        args.user,
        port=args.port,
        hostname=args.hostname,
        reject_null_sender=args.reject_null_sender,
        log=emit,
    )
    with primary:
        users = ", ".join(sorted(primary.users)) or "(none)"
        emit(f"primary {args.hostname} listening on {primary.host}:{primary.port}; users: {users}")
        done.wait()
    emit("primary stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
