"""The command channel of an open session (smtp/wire.py) on a recording transport:
commands sent in one turn go out in one write, replies are matched strictly in order
(a given-up waiter keeps its place), and anything that breaks the order closes it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiosmtplib
import pytest

from callahead.smtp.wire import MAX_LINE, QUICKACK, Wire

T = TypeVar("T")


class RecordingSocket:
    """What a TCP socket is asked (``setsockopt``)."""

    family = socket.AF_INET
    type = socket.SOCK_STREAM

    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class RecordingTransport(asyncio.Transport):
    def __init__(self, sock: RecordingSocket | None = None) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None
        self.sock = sock

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.sock if name == "socket" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def wrapper() -> T:
        return await fn()

    return asyncio.run(wrapper())


async def turn() -> None:
    """Let the loop run the write scheduled for this turn."""
    await asyncio.sleep(0)


def test_commands_of_one_turn_go_out_in_one_write_and_replies_come_back_in_order() -> None:
    async def go() -> None:
        transport = RecordingTransport()
        wire = Wire(transport)
        mail = wire.send(b"MAIL FROM:<>")
        first = wire.send(b"RCPT TO:<a@example.test>")
        second = wire.send(b"RCPT TO:<b@example.test>")
        assert transport.writes == []  # not before the turn ends
        await turn()
        assert transport.writes == [
            b"MAIL FROM:<>\r\nRCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"
        ]
        assert wire.outstanding == 3
        # All three replies in one segment, the last one cut in two.
        wire.data_received(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <b@exa")
        assert (await mail).code == 250
        assert (await first).code == 250
        assert not second.done()
        wire.data_received(b"mple.test>: User unknown\r\n")
        reply = await second
        assert (reply.code, reply.message) == (550, "5.1.1 <b@example.test>: User unknown")
        assert (wire.replies, wire.refusals, wire.outstanding) == (3, 1, 0)

    run(go)


def test_a_multiline_reply_is_one_reply() -> None:
    async def go() -> None:
        wire = Wire(RecordingTransport())
        first = wire.send(b"RCPT TO:<a@example.test>")
        second = wire.send(b"RCPT TO:<b@example.test>")
        wire.data_received(b"550-5.1.1 no such user\r\n550-here\r\n")
        assert not first.done()
        wire.data_received(b"550 5.1.1 at all\r\n250 ok\r\n")
        assert (await first).message == "5.1.1 no such user\nhere\n5.1.1 at all"
        assert (await second).code == 250

    run(go)


def test_a_waiter_that_gave_up_keeps_its_place() -> None:
    # The reply to a cancelled probe's RCPT is read and dropped: never handed to the
    # RCPT after it, which would then get another address's answer.
    async def go() -> None:
        wire = Wire(RecordingTransport())
        gone = wire.send(b"RCPT TO:<gone@example.test>")
        kept = wire.send(b"RCPT TO:<kept@example.test>")
        gone.cancel()
        wire.data_received(b"550 5.1.1 gone: no such user\r\n")
        assert not kept.done()
        wire.data_received(b"250 2.1.5 kept: Ok\r\n")
        assert (await kept).message == "2.1.5 kept: Ok"
        assert wire.refusals == 1  # the primary counted it all the same

    run(go)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"250 ok\r\n250 ok\r\n", "a reply nobody asked for"),
        (b"hello\r\n", "Malformed SMTP response line: hello"),
        (b"25x ok\r\n", "Malformed SMTP response line: 25x ok"),
        (b"2" * (MAX_LINE + 1), "Response too long"),
    ],
    ids=["unsolicited", "no code", "bad code", "line too long"],
)
def test_a_reply_out_of_order_closes_the_wire_and_fails_every_waiter(data: bytes, why: str) -> None:
    async def go() -> None:
        transport = RecordingTransport()
        wire = Wire(transport)
        first = wire.send(b"NOOP")
        wire.data_received(data)
        if first.done() and first.exception() is None:
            assert first.result().code == 250  # the first reply was its own
        else:
            with pytest.raises(aiosmtplib.SMTPResponseException, match=why):
                await first
        assert wire.closed and transport.closed
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            wire.send(b"RCPT TO:<a@example.test>")

    run(go)


def test_a_lost_connection_fails_every_waiter_and_nothing_more_is_written() -> None:
    async def go() -> None:
        transport = RecordingTransport()
        wire = Wire(transport)
        waiters = [wire.send(b"RCPT TO:<a@example.test>"), wire.send(b"RCPT TO:<b@x.test>")]
        wire.connection_lost(ConnectionResetError("reset by peer"))
        await turn()
        assert transport.writes == []
        for waiter in waiters:
            with pytest.raises(aiosmtplib.SMTPServerDisconnected, match="reset by peer"):
                await waiter
        assert wire.closed

    run(go)


def test_eof_fails_the_waiters() -> None:
    async def go() -> None:
        wire = Wire(RecordingTransport())
        waiter = wire.send(b"QUIT")
        assert wire.eof_received() is False  # the transport closes itself
        with pytest.raises(aiosmtplib.SMTPServerDisconnected, match="EOF"):
            await waiter

    run(go)


@pytest.mark.parametrize("line", [b"RCPT TO:<a@x.test>\r\nDATA", b"NOOP\n"])
def test_a_command_cannot_carry_a_line_end(line: bytes) -> None:
    async def go() -> None:
        wire = Wire(RecordingTransport())
        with pytest.raises(ValueError):
            wire.send(line)
        assert wire.outstanding == 0

    run(go)


def test_take_over_moves_the_connection_of_an_open_aiosmtplib_session() -> None:
    async def go() -> Any:
        transport = RecordingTransport()

        class Protocol:
            def __init__(self) -> None:
                self.transport = transport

        smtp = aiosmtplib.SMTP()
        smtp.protocol = Protocol()  # type: ignore[assignment]
        wire = Wire.take_over(smtp)
        assert transport.protocol is wire
        transport.closed = True
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            Wire.take_over(smtp)

    run(go)


@pytest.mark.skipif(QUICKACK is None, reason="no TCP_QUICKACK on this platform")
def test_an_ack_is_asked_at_once_while_more_replies_are_owed() -> None:
    # A primary that Nagles holds a reply back until the one before it is ACKed; with
    # nothing to send after a reply, the ACK would wait 40 ms (Linux's delayed ACK).
    async def go() -> None:
        sock = RecordingSocket()
        wire = Wire(RecordingTransport(sock))
        first, second = wire.send(b"RCPT TO:<a@x.test>"), wire.send(b"RCPT TO:<b@x.test>")
        wire.data_received(b"250 ok\r\n")
        assert sock.options == [(socket.IPPROTO_TCP, QUICKACK, 1)]
        wire.data_received(b"250 ok\r\n")  # nothing owed any more: the next command ACKs
        assert len(sock.options) == 1
        assert (await first).code == (await second).code == 250

    run(go)
