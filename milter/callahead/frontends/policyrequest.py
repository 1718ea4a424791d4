"""Reading Postfix policy requests (SMTPD access policy delegation): ``name=value``
lines ended by an empty line, cut out of what a connection sends, within bounds of
size, count and time; anything that cannot be Postfix's is a ``RequestError``, and the
policy service (policyservice.py) closes that connection."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from ..base.errors import CallaheadError

MAX_REQUEST = 16 * 1024
"""Bytes of one request, at most, its lines and the empty lines before it together
(Postfix's are under 2 KiB). Also the reader's buffer limit, so a connection holds
little more than this however it sends."""
MAX_LINE = MAX_REQUEST
"""Bytes of one attribute line, at most."""
MAX_ATTRIBUTES = 256
"""Attributes of one request, at most (Postfix 3.7 sends about 30)."""
REQUEST_TIMEOUT = 30.0
"""Seconds for the rest of a request once its first line came."""


class RequestError(CallaheadError):
    """A request that cannot be Postfix's: the connection is closed."""


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    attributes: Mapping[str, str]
    malformed: int = 0
    """Lines that were not ``name=value``."""

    def get(self, name: str) -> str:
        return self.attributes.get(name, "")


class RequestReader:
    """Reads the requests of one connection.

    Postfix writes a whole request at once, so one ``read`` usually brings it all; the
    request is then cut out of the buffer and split into lines by ``bytes`` methods (a
    ``readline`` per attribute cost about a third of the warm path's CPU). A request
    ends at its first empty line (``\\n\\n``, or ``\\n\\r\\n`` from a client that ends its
    lines with CRLF); empty lines before it are skipped but count against
    ``MAX_REQUEST``. Deadlines: ``idle_timeout`` while nothing of the next request has
    come, then ``REQUEST_TIMEOUT`` for the rest of it."""

    def __init__(self, reader: asyncio.StreamReader, idle_timeout: float) -> None:
        self._reader = reader
        self._idle_timeout = idle_timeout
        self._buffer = b""
        self._skipped = 0
        """Bytes of empty lines skipped before the next request."""

    @property
    def pending(self) -> bool:
        """Part of the next request has been read (a request being sent, or one sent
        along with the last, not taken yet)."""
        return bool(self._buffer)

    async def next(self) -> PolicyRequest | None:
        """The next request, or None when the client closed (or stayed silent for the
        idle timeout) between requests."""
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            request = self._take()
            if request is not None:
                return request
            if self._buffer and deadline is None:
                deadline = loop.time() + REQUEST_TIMEOUT
            try:
                if deadline is None:
                    async with asyncio.timeout(self._idle_timeout):
                        data = await self._reader.read(MAX_REQUEST)
                else:
                    async with asyncio.timeout_at(deadline):
                        data = await self._reader.read(MAX_REQUEST)
            except TimeoutError:
                if not self._buffer:
                    return None
                raise RequestError("the request was not finished in time") from None
            if not data:
                if not self._buffer:
                    return None
                if not self._buffer.endswith(b"\n"):
                    raise RequestError("the connection closed inside a line")
                raise RequestError("the connection closed inside a request")
            self._buffer += data

    def _take(self) -> PolicyRequest | None:
        """A complete request cut from the buffer, if there is one."""
        buffer = self._buffer
        skip = 0  # empty lines before the request, cut once (not a copy per line)
        while True:
            if buffer.startswith(b"\n", skip):
                skip += 1
            elif buffer.startswith(b"\r\n", skip):
                skip += 2
            else:
                break
        if skip:
            self._skipped += skip
            buffer = self._buffer = buffer[skip:]
        end, size = buffer.find(b"\n\n"), 2
        crlf = buffer.find(b"\n\r\n")
        if crlf >= 0 and (end < 0 or crlf < end):
            end, size = crlf, 3
        size += end
        if end < 0:
            if self._skipped + len(buffer) > MAX_REQUEST:
                raise RequestError(f"a request longer than {MAX_REQUEST} bytes")
            return None
        if self._skipped + size > MAX_REQUEST:
            raise RequestError(f"a request longer than {MAX_REQUEST} bytes")
        self._buffer = buffer[size:]
        self._skipped = 0
        # One decode for the whole request: bytes that are not UTF-8 stay as surrogates
        # (a recipient is judged bad_address, not mistaken for another).
        text = buffer[:end].decode("utf-8", "surrogateescape")
        if "\r" in text:
            text = text.replace("\r\n", "\n").removesuffix("\r")
        lines = text.split("\n")
        if len(lines) > MAX_ATTRIBUTES:
            raise RequestError(f"more than {MAX_ATTRIBUTES} attributes")
        try:  # every line name=value, as Postfix writes them: built in C
            attributes = dict(line.split("=", 1) for line in lines)
        except ValueError:  # a line without "="
            attributes = {"": ""}
        if "" not in attributes:
            return PolicyRequest(attributes, 0)
        attributes = {}
        malformed = 0
        for line in lines:
            name, sep, value = line.partition("=")
            if sep and name:
                attributes[name] = value
            else:
                malformed += 1
        return PolicyRequest(attributes, malformed)
