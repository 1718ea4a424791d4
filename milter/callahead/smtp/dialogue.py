"""The SMTP dialogue of one session as ``callahead probe --explain`` shows it (``C:``,
``S:`` and ``--`` lines), and the one way a session sends a command: recorded when the
transcript is on, at no cost when it is off (the hot path). Pipelined commands show as
sent, their replies as read (in order, after them).
"""

from __future__ import annotations

import asyncio

import aiosmtplib

from .wire import Wire


class Dialogue:
    def __init__(self, record: bool) -> None:
        self._lines: list[str] | None = [] if record else None

    @property
    def lines(self) -> tuple[str, ...]:
        return () if self._lines is None else tuple(self._lines)

    def said(self, line: str) -> None:
        if self._lines is not None:
            self._lines.append(f"C: {line}")

    def heard(self, code: int, message: str) -> None:
        if self._lines is not None:
            lines = message.split("\n") or [""]
            for i, text in enumerate(lines):
                sep = " " if i == len(lines) - 1 else "-"
                self._lines.append(f"S: {code}{sep}{text}")

    def note(self, text: str) -> None:
        if self._lines is not None:
            self._lines.append(f"-- {text}")

    async def command(
        self, smtp: aiosmtplib.SMTP, verb: bytes, argument: bytes = b""
    ) -> aiosmtplib.SMTPResponse:
        """Send one command on ``smtp`` and read its reply, both recorded."""
        words = (verb, argument) if argument else (verb,)
        if self._lines is not None:
            self.said(b" ".join(words).decode("utf-8", "replace"))
        reply = await smtp.execute_command(*words)
        self.heard(reply.code, reply.message)
        return reply

    def send(self, wire: Wire, line: bytes) -> asyncio.Future[aiosmtplib.SMTPResponse]:
        """Send one command on ``wire``, recorded; the future of its reply (``reply``)."""
        if self._lines is not None:
            self.said(line.decode("utf-8", "replace"))
        return wire.send(line)

    async def reply(
        self, pending: asyncio.Future[aiosmtplib.SMTPResponse]
    ) -> aiosmtplib.SMTPResponse:
        """The reply of a command ``send`` sent, recorded."""
        reply = await pending
        self.heard(reply.code, reply.message)
        return reply
