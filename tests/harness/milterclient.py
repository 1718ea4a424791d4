"""A milter client that speaks libmilter's protocol as Postfix's milter8 does, to talk to
callahead's milter directly, with no Postfix in front (which would cut a long command
line, or hold a connection open without a word)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

VERSION = 6
ALL_ACTIONS = 0x1FF
"""Every action an MTA may allow a milter (SMFIF_*)."""
ALL_PROTOCOL = 0x1FFFFF
"""Every step a milter may skip (SMFIP_NO*)."""
MAX_DATA = 65535
"""Bytes of one command's data, at most: libmilter closes the connection on a longer
one (MILTER_MAX_DATA_SIZE)."""


class MilterClosed(ConnectionError):
    """The milter closed the connection instead of answering."""


@dataclass(frozen=True)
class Reply:
    command: bytes
    """``c`` continue, ``r`` reject, ``t`` tempfail, ``y`` a reply with its text, ..."""
    data: bytes

    @property
    def text(self) -> str:
        return self.data.rstrip(b"\0").decode(errors="replace")


class MilterClient:
    """One connection to a milter on ``host``:``port``."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, command: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(data) + 1) + command + data)

    def reply(self) -> Reply:
        size = struct.unpack("!I", self._exactly(4))[0]
        packet = self._exactly(size)
        return Reply(packet[:1], packet[1:])

    def negotiate(self) -> Reply:
        """OPTNEG as Postfix sends it; the milter's answer (``O``)."""
        self.send(b"O", struct.pack("!III", VERSION, ALL_ACTIONS, ALL_PROTOCOL))
        return self.reply()

    def rcpt(self, argument: bytes, queue_id: str = "TESTQID", client: str = "192.0.2.7") -> Reply:
        """The RCPT macros and ``RCPT TO:argument`` (the argument as the client wrote it,
        brackets and all); the milter's answer."""
        macros = f"i\0{queue_id}\0{{client_addr}}\0{client}\0".encode()
        self.send(b"D", b"R" + macros)
        self.send(b"R", argument + b"\0")
        return self.reply()

    def quit(self) -> None:
        self.send(b"Q")

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise MilterClosed(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data
