"""A scripted SMTP server for fault-matrix tests.

``ScriptedServer`` is a small SMTP server on 127.0.0.1 written on raw asyncio streams
(not aiosmtpd), so that it can misbehave in any way a test needs: stay silent, greet
with 421 or 554, reject EHLO, MAIL or RCPT, answer RCPT late or not at all, hang up
after RCPT, offer STARTTLS and then break the handshake, count errors and hang up like
Postfix's ``smtpd_hard_error_limit``, or slow down like ``smtpd_soft_error_limit``.

What it does is read from a ``Script`` at every step, so a test can change it while
sessions are open (``server.update(rcpt_delay=5.0)``). It also accepts real
deliveries (MAIL, RCPT, DATA with dot-stuffing removed), so a Postfix backup can
deliver to it, and it records every command line exactly as received, with the reply
it got (``commands``), and every message (``messages``, ``mailbox``).

Like ``tests.harness.primary.Primary`` it runs its own loop in its own thread, can be
stopped and started again on the same port, and aborts every open connection when
stopped.

Behaviour not spelled out by the ``Script`` fields, modelled on Postfix:

- A banner starting with ``421`` is sent and the connection closed. Any other non-2xx
  banner (``554 ...``) is sent and then every command but QUIT gets
  ``503 5.5.1 Error: bad sequence of commands`` (RFC 5321 section 3.1).
- MAIL before a successful HELO/EHLO gets ``503 5.5.1 Error: send HELO/EHLO first``;
  a second MAIL ``503 5.5.1 Error: nested MAIL command``; RCPT without an accepted MAIL
  ``503 5.5.1 Error: need MAIL command``; DATA without MAIL
  ``503 5.5.1 Error: need RCPT command`` and without an accepted RCPT
  ``554 5.5.1 Error: no valid recipients``.
- STARTTLS when not advertised, or once TLS is on: ``502 5.5.1 Error: command not
  implemented``; before EHLO: ``503 5.5.1 Error: send EHLO first``. After the
  handshake the session starts over (EHLO needed again) and STARTTLS is no longer
  advertised.
- Every 4xx/5xx reply counts as an error, these ones included; a message accepted at
  the end of DATA resets the count (as in Postfix).
- With ``rcpt_delay`` and ``disconnect_after_rcpt`` both set, the server waits
  ``rcpt_delay`` and then hangs up.
- A reply string with ``\\n`` in it is sent as a multiline reply (``250-a``/``250 b``).
- The ``421`` sent on reaching ``max_errors`` is not recorded in ``commands`` (it
  answers no command); the final ``.`` of DATA is, with the reply to the message.
- ``tls="broken"`` waits for the client's first TLS bytes, then sends non-TLS bytes and
  a FIN: the client's handshake fails with ``ssl.SSLError`` (wrong version number).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copy
import dataclasses
import shutil
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tests.harness.primary import _ThreadedServer
from tests.harness.tlsutil import self_signed, server_context

__all__ = [
    "HOSTNAME",
    "Command",
    "Delivery",
    "Script",
    "ScriptedServer",
]

HOSTNAME = "scripted.test"
LINE_LIMIT = 1 << 20  # longest line (command or message line) read, in bytes

NOOP_OK = "250 2.0.0 Ok"
QUIT_OK = "221 2.0.0 Bye"
DATA_END_OK = "250 2.0.0 Ok: queued"
TOO_MANY_ERRORS = "421 4.7.0 Error: too many errors"
UNKNOWN_COMMAND = "502 5.5.2 Error: command not recognized"
NOT_IMPLEMENTED = "502 5.5.1 Error: command not implemented"
BAD_SEQUENCE = "503 5.5.1 Error: bad sequence of commands"
NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
NEED_EHLO = "503 5.5.1 Error: send EHLO first"
NESTED_MAIL = "503 5.5.1 Error: nested MAIL command"
NEED_MAIL = "503 5.5.1 Error: need MAIL command"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
NO_VALID_RCPT = "554 5.5.1 Error: no valid recipients"
TLS_UNAVAILABLE = "454 4.7.0 TLS not available due to local problem"
BROKEN_TLS_LINGER = 10.0  # seconds to wait for the client to hang up
TLS_GARBAGE = b"this is not a TLS server hello\r\n" * 4


@dataclass
class Script:
    """What the server answers. Read afresh at every step of every session.

    Change it through ``ScriptedServer.update(**changes)``, which replaces fields under
    the server's lock; plain attribute assignment on ``server.script`` works too.
    """

    banner: str | None = f"220 {HOSTNAME} ESMTP"
    """Greeting; ``None``: accept TCP and never send anything (commands are still
    read and recorded, with reply ``None``)."""
    banner_delay: float = 0.0
    ehlo: str = "250"
    """First line of the EHLO reply; a bare 2xx code becomes ``250-scripted.test``.
    A 2xx reply lists ``extensions``; any other code is sent as it is, alone."""
    extensions: tuple[str, ...] = ("PIPELINING", "8BITMIME", "SMTPUTF8")
    helo: str = f"250 {HOSTNAME}"
    mail: str = "250 2.1.0 Ok"
    rcpt_default: str = "550 5.1.1 User unknown"
    users: frozenset[str] = frozenset()
    """Addresses (compared case-insensitively) answered with ``rcpt_ok``."""
    rcpt_ok: str = "250 2.1.5 Ok"
    rcpt_overrides: dict[str, str] = field(default_factory=dict)
    """Address (compared case-insensitively) -> full reply line; beats ``users``."""
    postmaster: str | None = "250 2.1.5 Ok"
    """Reply to ``postmaster@`` any domain (RFC 5321 4.5.1 makes every domain accept it),
    unless ``rcpt_overrides`` names the address; None: answered like any address."""
    rcpt_delay: float = 0.0
    disconnect_after_rcpt: bool = False
    starttls: str = "220 2.0.0 Ready to start TLS"
    tls: Literal["ok", "broken"] = "ok"
    max_errors: int | None = None
    soft_error_limit: int | None = None
    error_sleep: float = 0.0
    rset: str = "250 2.0.0 Ok"
    data: str = "354 End data with <CR><LF>.<CR><LF>"
    data_end: str = DATA_END_OK
    """Reply after the final dot; a 2xx reply stores the message."""

    def __post_init__(self) -> None:
        if self.tls not in ("ok", "broken"):
            raise ValueError(f"tls must be 'ok' or 'broken', not {self.tls!r}")

    def rcpt_reply(self, address: str) -> str:
        """The reply this script gives to ``RCPT TO:<address>``."""
        key = address.lower()
        for addr, reply in self.rcpt_overrides.items():
            if addr.lower() == key:
                return reply
        if any(user.lower() == key for user in self.users):
            return self.rcpt_ok
        if self.postmaster is not None and key.startswith("postmaster@"):
            return self.postmaster
        return self.rcpt_default


_SCRIPT_FIELDS = frozenset(f.name for f in dataclasses.fields(Script))


@dataclass(frozen=True)
class Command:
    """One command line as received (decoded as UTF-8 with surrogateescape, without
    the line ending) and the reply sent to it: ``None`` while unanswered, or if none
    was ever sent. A multiline reply is its lines joined with ``\\n``."""

    session: int
    line: str
    reply: str | None


@dataclass(frozen=True)
class Delivery:
    """One message accepted at the end of DATA. ``sender`` and ``recipients`` are the
    paths inside ``<>`` as received; ``data`` has CRLF line ends and no dot-stuffing."""

    session: int
    sender: str
    recipients: tuple[str, ...]
    data: bytes


def path_of(line: str) -> str:
    """The address in a ``MAIL FROM:``/``RCPT TO:`` line: the exact text inside ``<>``
    (a ``>`` inside a quoted local part does not end it), or without brackets the first
    word after the colon."""
    _, colon, rest = line.partition(":")
    if not colon:
        return ""
    rest = rest.lstrip(" ")
    if not rest.startswith("<"):
        return rest.split(" ", 1)[0]
    quoted = escaped = False
    for index, char in enumerate(rest[1:], start=1):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return rest[1:index]
    return rest[1:]


def _verb(line: str) -> str:
    return line.split(" ", 1)[0].split(":", 1)[0].upper()


def _starts_with_verb(line: str, verb: str) -> bool:
    upper, want = line.upper(), verb.upper()
    return upper.startswith(want) and (len(upper) == len(want) or not upper[len(want)].isalnum())


def _reply_lines(reply: str) -> list[str]:
    """``reply`` split into lines, all but the last marked as continued (``250-``)."""
    lines = [part.rstrip("\r") for part in reply.split("\n")]
    out: list[str] = []
    for index, line in enumerate(lines):
        last = index == len(lines) - 1
        if not last and len(line) >= 3 and line[:3].isdigit() and line[3:4] in ("", " ", "-"):
            line = f"{line[:3]}-{line[4:]}"
        out.append(line)
    return out


def _is_error(reply: str) -> bool:
    return reply[:1] in ("4", "5")


def _is_ok(reply: str) -> bool:
    return reply[:1] == "2"


class _Close(Exception):
    """End the session: close the connection (what was written is still sent)."""


# A certificate for every ScriptedServer without one of its own, made once per process.
_tls_lock = threading.Lock()
_tls_dir: Path | None = None


def _default_tls_context() -> ssl.SSLContext:
    global _tls_dir
    with _tls_lock:
        if _tls_dir is None:
            _tls_dir = Path(tempfile.mkdtemp(prefix="scripted-tls-"))
            atexit.register(shutil.rmtree, _tls_dir, True)
        directory = _tls_dir
    cert, key = self_signed(directory, HOSTNAME)
    return server_context(cert, key)


class _Protocol(asyncio.StreamReaderProtocol):
    """Stream protocol that reports its connection to the server and runs a session."""

    def __init__(self, owner: ScriptedServer) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(asyncio.StreamReader(limit=LINE_LIMIT, loop=loop), self._serve, loop=loop)
        self._owner = owner
        self._tracked: asyncio.BaseTransport | None = None
        self._session = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._tracked is None:  # loop.start_tls does not call it again, but be sure
            self._tracked = transport
            self._session = self._owner._session_started(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._connection_lost(self._tracked)
        super().connection_lost(exc)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _Session(self._owner, self._session, reader, writer).run()


class _Session:
    """One SMTP session; runs in the server's loop."""

    def __init__(
        self,
        owner: ScriptedServer,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._owner = owner
        self._number = number
        self._reader = reader
        self._writer = writer
        self._errors = 0
        self._rejecting = False  # non-2xx banner: only QUIT is served
        self._tls = False
        self._greeted = False
        self._sender: str | None = None  # set once MAIL was accepted
        self._recipients: list[str] = []

    async def run(self) -> None:
        try:
            await self._converse()
        except (_Close, OSError, EOFError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writer.close()

    async def _readline(self) -> bytes:
        line = await self._reader.readline()
        if not line:
            raise _Close
        return line

    async def _converse(self) -> None:
        script = self._owner._snapshot()
        if script.banner is None:
            await self._silent()
            return
        if script.banner_delay > 0:
            await asyncio.sleep(script.banner_delay)
        await self._send(script.banner)
        if script.banner.startswith("421"):
            raise _Close
        self._rejecting = not _is_ok(script.banner)
        while True:
            raw = await self._readline()
            line = raw.rstrip(b"\n")
            line = line.removesuffix(b"\r")
            text = line.decode("utf-8", "surrogateescape")
            index = self._owner._record(self._number, text)
            await self._dispatch(text, index)

    async def _silent(self) -> None:
        while True:
            raw = await self._readline()
            text = raw.rstrip(b"\n").removesuffix(b"\r").decode("utf-8", "surrogateescape")
            self._owner._record(self._number, text)

    # -- replies -----------------------------------------------------------------------

    async def _send(self, reply: str) -> None:
        self._writer.write(("\r\n".join(_reply_lines(reply)) + "\r\n").encode())
        await self._writer.drain()

    async def _reply(self, index: int, reply: str) -> None:
        """Answer the command recorded at ``index``, counting errors like Postfix."""
        script = self._owner._snapshot()
        await self._error_sleep(script)
        # Recorded before it is sent: a client that has read the reply must find it here.
        self._owner._set_reply(index, "\n".join(_reply_lines(reply)))
        await self._send(reply)
        if _is_error(reply):
            self._errors += 1
            if script.max_errors is not None and self._errors >= script.max_errors:
                await self._error_sleep(script)
                await self._send(TOO_MANY_ERRORS)
                raise _Close

    async def _error_sleep(self, script: Script) -> None:
        limit = script.soft_error_limit
        if limit is not None and self._errors >= limit and script.error_sleep > 0:
            await asyncio.sleep(script.error_sleep)

    def _reset_transaction(self) -> None:
        self._sender = None
        self._recipients = []

    # -- commands ----------------------------------------------------------------------

    async def _dispatch(self, line: str, index: int) -> None:
        verb = _verb(line)
        if verb == "QUIT":
            await self._reply(index, QUIT_OK)
            raise _Close
        if self._rejecting:
            await self._reply(index, BAD_SEQUENCE)
            return
        handler = {
            "EHLO": self._ehlo,
            "HELO": self._helo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "STARTTLS": self._starttls,
        }.get(verb)
        if handler is None:
            await self._reply(index, UNKNOWN_COMMAND)
        else:
            await handler(line, index)

    async def _ehlo(self, line: str, index: int) -> None:
        script = self._owner._snapshot()
        reply = script.ehlo
        if _is_ok(reply):
            first = reply if len(reply.strip()) > 3 else f"{reply.strip()} {HOSTNAME}"
            code = first[:3]
            keywords = [
                ext for ext in script.extensions if not (self._tls and ext.upper() == "STARTTLS")
            ]
            reply = "\n".join([first, *(f"{code} {ext}" for ext in keywords)])
        self._reset_transaction()
        self._greeted = _is_ok(reply)
        await self._reply(index, reply)

    async def _helo(self, line: str, index: int) -> None:
        reply = self._owner._snapshot().helo
        self._reset_transaction()
        self._greeted = _is_ok(reply)
        await self._reply(index, reply)

    async def _mail(self, line: str, index: int) -> None:
        if not self._greeted:
            await self._reply(index, NEED_HELO)
            return
        if self._sender is not None:
            await self._reply(index, NESTED_MAIL)
            return
        reply = self._owner._snapshot().mail
        if _is_ok(reply):
            self._sender = path_of(line)
            self._recipients = []
        await self._reply(index, reply)

    async def _rcpt(self, line: str, index: int) -> None:
        script = self._owner._snapshot()
        if script.rcpt_delay > 0:
            await asyncio.sleep(script.rcpt_delay)
            script = self._owner._snapshot()
        if script.disconnect_after_rcpt:
            raise _Close
        if self._sender is None:
            await self._reply(index, NEED_MAIL)
            return
        address = path_of(line)
        reply = script.rcpt_reply(address)
        if _is_ok(reply):
            self._recipients.append(address)
        await self._reply(index, reply)

    async def _data(self, line: str, index: int) -> None:
        if self._sender is None:
            await self._reply(index, NEED_RCPT)
            return
        if not self._recipients:
            await self._reply(index, NO_VALID_RCPT)
            return
        reply = self._owner._snapshot().data
        await self._reply(index, reply)
        if not reply.startswith("354"):
            return
        body: list[bytes] = []
        while True:
            raw = await self._readline()
            content = raw.rstrip(b"\n").removesuffix(b"\r")
            if content == b".":
                break
            if content.startswith(b"."):
                content = content[1:]
            body.append(content + b"\r\n")
        end = self._owner._snapshot().data_end
        data_index = self._owner._record(self._number, ".")
        if _is_ok(end):
            self._owner._deliver(
                Delivery(self._number, self._sender, tuple(self._recipients), b"".join(body))
            )
            self._errors = 0
        self._reset_transaction()
        await self._reply(data_index, end)

    async def _rset(self, line: str, index: int) -> None:
        reply = self._owner._snapshot().rset
        if _is_ok(reply):
            self._reset_transaction()
        await self._reply(index, reply)

    async def _noop(self, line: str, index: int) -> None:
        await self._reply(index, NOOP_OK)

    async def _starttls(self, line: str, index: int) -> None:
        script = self._owner._snapshot()
        offered = any(ext.upper() == "STARTTLS" for ext in script.extensions)
        if self._tls or not offered:
            await self._reply(index, NOT_IMPLEMENTED)
            return
        if not self._greeted:
            await self._reply(index, NEED_EHLO)
            return
        context: ssl.SSLContext | None = None
        if script.starttls.startswith("220") and script.tls == "ok":
            # Before the 220: once the client has it, its ClientHello may come at any
            # time and must reach the TLS layer, not the plain-text reader.
            try:
                context = await self._owner._tls_context()
            except (OSError, RuntimeError, ssl.SSLError):
                await self._reply(index, TLS_UNAVAILABLE)
                return
        ready = script.starttls.startswith("220")
        transport = self._writer.transport
        if ready and isinstance(transport, asyncio.ReadTransport):
            # Whatever the client sends once it has the 220 (its ClientHello) must stay
            # in the socket for the TLS layer, not go to the plain-text reader.
            transport.pause_reading()
        await self._reply(index, script.starttls)
        if not ready:
            return
        if context is None:  # tls == "broken"
            await self._break_tls(transport)
        else:
            await self._writer.start_tls(context)  # resumes reading
        self._tls = True
        self._greeted = False
        self._reset_transaction()

    async def _break_tls(self, transport: asyncio.BaseTransport) -> None:
        """Answer the client's ClientHello with garbage and a FIN, so that its handshake
        fails reading a record that is not TLS. Waiting for the ClientHello first keeps
        the garbage out of the client's plain-text read buffer (where smtplib, for one,
        would swallow it with the 220 and then see a bare EOF). The client's bytes are
        then read and dropped until it closes, so that closing never sends an RST that
        could overtake the garbage."""
        if isinstance(transport, asyncio.ReadTransport):
            transport.resume_reading()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BROKEN_TLS_LINGER):
                await self._reader.read(4096)
        self._writer.write(TLS_GARBAGE)
        if self._writer.can_write_eof():
            self._writer.write_eof()
        await self._writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BROKEN_TLS_LINGER):
                while await self._reader.read(4096):
                    pass
        raise _Close


class ScriptedServer(_ThreadedServer):
    """An SMTP server on 127.0.0.1:``port`` that answers as its ``Script`` says.

    ``tls_context`` is the server-side context for STARTTLS; by default a self-signed
    certificate for ``scripted.test`` made with ``openssl`` on first use.
    """

    _kind = "scripted-server"

    def __init__(
        self,
        script: Script | None = None,
        *,
        port: int | None = None,
        tls_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(port, host)
        self._lock = threading.Lock()
        self._script = script if script is not None else Script()
        self._commands: list[Command] = []
        self._cleared = 0  # commands forgotten by clear(); record ids count them too
        self._deliveries: list[Delivery] = []
        self._ssl_context = tls_context

    def _make_protocol(self) -> asyncio.BaseProtocol:
        return _Protocol(self)

    # -- script ------------------------------------------------------------------------

    @property
    def script(self) -> Script:
        """The live script (not a copy)."""
        return self._script

    def update(self, **changes: Any) -> None:
        """Replace ``Script`` fields, all at once as seen by the sessions."""
        unknown = set(changes) - _SCRIPT_FIELDS
        if unknown:
            raise TypeError(f"no such Script field(s): {', '.join(sorted(unknown))}")
        if "tls" in changes and changes["tls"] not in ("ok", "broken"):
            raise ValueError(f"tls must be 'ok' or 'broken', not {changes['tls']!r}")
        with self._lock:
            for name, value in changes.items():
                setattr(self._script, name, value)

    def _snapshot(self) -> Script:
        with self._lock:
            snapshot = copy.copy(self._script)
            snapshot.rcpt_overrides = dict(snapshot.rcpt_overrides)
            return snapshot

    async def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # openssl runs in a worker thread: other sessions go on meanwhile.
            self._ssl_context = await asyncio.to_thread(_default_tls_context)
        return self._ssl_context

    # -- records (written from the loop thread) ----------------------------------------

    def _session_started(self, transport: asyncio.BaseTransport) -> int:
        self._connection_made(transport)
        return self.connections  # connections are only made in the loop thread

    def _record(self, session: int, line: str) -> int:
        """Record an unanswered command; returns its id for ``_set_reply``."""
        with self._lock:
            self._commands.append(Command(session, line, None))
            return self._cleared + len(self._commands) - 1

    def _set_reply(self, record_id: int, reply: str) -> None:
        with self._lock:
            index = record_id - self._cleared
            if 0 <= index < len(self._commands):  # else forgotten by clear() meanwhile
                self._commands[index] = dataclasses.replace(self._commands[index], reply=reply)

    def _deliver(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries.append(delivery)

    # -- records (any thread) ----------------------------------------------------------

    @property
    def commands(self) -> list[Command]:
        """Every command line received, in order, over all sessions. The final ``.``
        of DATA is recorded as a command too, with the reply to the message."""
        with self._lock:
            return list(self._commands)

    def rcpt_lines(self) -> list[str]:
        """The ``RCPT`` command lines, exactly as received."""
        return [c.line for c in self.commands if _starts_with_verb(c.line, "RCPT")]

    def rcpts(self) -> list[str]:
        """The addresses of all ``RCPT`` lines (the exact text inside ``<>``), in order,
        whatever the reply."""
        return [path_of(line) for line in self.rcpt_lines()]

    def count(self, verb: str) -> int:
        """How many command lines start with ``verb`` (case-insensitive)."""
        return sum(1 for c in self.commands if _starts_with_verb(c.line, verb))

    def sessions_with_rcpt(self) -> int:
        """How many sessions sent at least one ``RCPT``."""
        return len({c.session for c in self.commands if _starts_with_verb(c.line, "RCPT")})

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    @property
    def messages(self) -> list[bytes]:
        """The bodies of the messages accepted, oldest first."""
        with self._lock:
            return [d.data for d in self._deliveries]

    def mailbox(self, addr: str) -> list[bytes]:
        """The messages delivered to ``addr`` (case-insensitive), oldest first."""
        key = addr.lower()
        with self._lock:
            return [d.data for d in self._deliveries if any(r.lower() == key for r in d.recipients)]

    def clear(self) -> None:
        """Forget recorded commands and messages (not the connection count)."""
        with self._lock:
            self._cleared += len(self._commands)
            self._commands.clear()
            self._deliveries.clear()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ScriptedServer {self.host}:{self.port} {state}>"
