"""The command channel of an open probe session: commands written, replies read strictly
in the order the commands were written (RFC 2920 pipelining, when the primary offers it).

aiosmtplib opens the session (connect, banner, EHLO, STARTTLS) but reads one reply per
command it writes: of two replies that arrive in one segment it parses the first and
leaves the second in its buffer until more data comes. So once the session is open its
transport is handed to a ``Wire`` (``take_over``), which answers every command it sends
with a future of its reply:

* **Order is the only key.** Replies are matched to commands first in, first out, and a
  command whose waiter went away (a cancelled probe) keeps its place: its reply is read
  and dropped, never given to the command after it. A reply nobody asked for (a ``421``
  before an idle timeout), an unreadable reply and a lost connection close the wire and
  fail every waiter; nothing is ever matched by guessing.
* **One write per turn of the event loop.** Commands sent in the same turn (a probe's
  ``MAIL FROM`` and ``RCPT TO``, the RCPTs of concurrent probes) go out in one write.
  Whether a command may be sent before the previous reply is the session's decision:
  without PIPELINING it waits for each reply before sending the next command.

* **An ACK at once while replies are owed.** A primary without ``TCP_NODELAY`` (Postfix's
  smtpd on loopback, measured) holds a reply back while its previous one is unacknowledged
  (Nagle), and Linux delays the ACK of a segment that nothing is sent after by 40 ms. A
  pipelined RCPT sent before the reply to the one ahead of it leaves nothing to send
  when that reply comes, so each such reply waited about 40 ms (first-contact p99 at 10
  sessions 45-48 ms against 25 without pipelining; bench/RESULTS-firstcontact.md). So
  after reading a reply with more still owed, the wire asks the kernel for an immediate
  ACK (``TCP_QUICKACK``, where the platform has it).

Exceptions are aiosmtplib's (``SMTPServerDisconnected``, ``SMTPResponseException``), so
that the session handles a failure the same way before and after the hand-over.

Lives on the probe event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import cast

import aiosmtplib
from aiosmtplib.typing import SMTPStatus

MAX_LINE = 8192
"""Bytes one reply line may take (aiosmtplib's limit too)."""
MAX_REPLY = 128 * 1024
"""Bytes unparsed input may take: one reply, or several pipelined ones."""


QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
"""Linux's option for an immediate ACK (not sticky: asked again after every read)."""


def _tcp_socket(transport: asyncio.BaseTransport) -> socket.socket | None:
    sock = transport.get_extra_info("socket")
    if QUICKACK is None or sock is None:
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    return sock  # type: ignore[no-any-return]


class Wire(asyncio.Protocol):
    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._waiting: deque[asyncio.Future[aiosmtplib.SMTPResponse]] = deque()
        self._out: list[bytes] = []
        self._buffer = bytearray()
        self._lost: Exception | None = None
        """Why the wire is closed; None while it is open."""
        self.replies = 0
        """Replies read."""
        self.refusals = 0
        """Replies read that were 4xx or 5xx: what a Postfix primary counts as errors
        (its waiter may have gone away: the primary counted it all the same)."""
        self._quickack = _tcp_socket(transport)
        """The TCP socket to ask an immediate ACK of (None: not TCP, or no such option)."""

    @classmethod
    def take_over(cls, smtp: aiosmtplib.SMTP) -> Wire:
        """Move the open connection of ``smtp`` to a new wire (``smtp`` sends nothing
        more on it)."""
        protocol = smtp.protocol
        transport = None if protocol is None else protocol.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("the session closed as it opened")
        wire = cls(cast(asyncio.Transport, transport))
        transport.set_protocol(wire)
        return wire

    @property
    def closed(self) -> bool:
        return self._lost is not None

    @property
    def outstanding(self) -> int:
        """Commands sent and not answered yet."""
        return len(self._waiting)

    def send(self, line: bytes) -> asyncio.Future[aiosmtplib.SMTPResponse]:
        """Queue one command (without CRLF) for this turn's write; the future of its
        reply. Raises SMTPServerDisconnected when the wire is closed."""
        if self._lost is not None:
            raise aiosmtplib.SMTPServerDisconnected(str(self._lost))
        if b"\r" in line or b"\n" in line:
            raise ValueError("a command may not contain CR or LF")
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(line + b"\r\n")
        reply: asyncio.Future[aiosmtplib.SMTPResponse] = self._loop.create_future()
        self._waiting.append(reply)
        return reply

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if data and self._lost is None:
            self._transport.write(data)

    def close(self) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("session closed"))
        self._transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._lost is not None:
            return
        self._buffer += data
        try:
            while True:
                reply = self._next_reply()
                if reply is None:
                    break
                self.replies += 1
                if reply.code >= 400:
                    self.refusals += 1
                if not self._waiting:
                    raise aiosmtplib.SMTPResponseException(
                        reply.code, f"a reply nobody asked for: {reply.message}"
                    )
                waiter = self._waiting.popleft()
                if not waiter.done():
                    waiter.set_result(reply)
            if len(self._buffer) > MAX_REPLY:
                raise aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response, "Response too long"
                )
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
            self._transport.close()
            return
        if self._waiting and self._quickack is not None:
            self._ack_now(self._quickack)

    def _ack_now(self, sock: socket.socket) -> None:
        try:
            if QUICKACK is not None:
                sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
        except OSError:
            self._quickack = None

    def _next_reply(self) -> aiosmtplib.SMTPResponse | None:
        """The first complete reply in the buffer, cut from it; None: none complete."""
        lines: list[bytes] = []
        offset = 0
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", offset)
            if end == -1:
                if len(buffer) - offset > MAX_LINE:
                    raise aiosmtplib.SMTPResponseException(
                        SMTPStatus.invalid_response, "Response too long"
                    )
                return None
            line = bytes(buffer[offset : end + 1])
            offset = end + 1
            if len(line) > MAX_LINE:
                raise aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response, "Response too long"
                )
            code = line[:3]
            if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                text = line.decode("utf-8", "replace").rstrip("\r\n")
                raise aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response, f"Malformed SMTP response line: {text}"
                )
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del buffer[:offset]
                message = b"\n".join(lines).decode("utf-8", "surrogateescape")
                return aiosmtplib.SMTPResponse(int(code), message)

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected(str(exc) if exc else "Connection lost"))

    def pause_writing(self) -> None:  # commands are a few bytes: nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    def _fail(self, exc: Exception) -> None:
        if self._lost is None:
            self._lost = exc
        self._out.clear()
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(exc)
                waiter.exception()  # retrieved: nobody may await it any more
