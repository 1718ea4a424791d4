"""The SMTP probe: ask a primary whether it would accept mail for one address.

The dialogue is EHLO (HELO if EHLO is refused), ``MAIL FROM:<sender>`` (the null sender by
default), ``RCPT TO:<address>``, then QUIT. Only the reply to RCPT TO can decide:

* 2xx at RCPT TO: the address is valid;
* 5xx at RCPT TO: the address is unknown;
* anything else is a tempfail: a refused or timed-out connection, a disconnect, any 4xx,
  and any 5xx before RCPT TO (banner, EHLO, MAIL FROM). A primary that refuses the null
  sender says nothing about the recipient, so it must never cause a reject.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiosmtplib

from .routes import Nexthop

log = logging.getLogger(__name__)

MAX_PATH_OCTETS = 256
"""RFC 5321 4.5.3.1.3: a reverse or forward path, angle brackets included."""
MAX_LOCAL_PART_OCTETS = 64
"""RFC 5321 4.5.3.1.1."""

QUIT_TIMEOUT = 2.0
"""Seconds a courtesy QUIT may take after the verdict is known."""


class Verdict(enum.Enum):
    VALID = "valid"
    UNKNOWN = "unknown"
    TEMPFAIL = "tempfail"


class Stage(enum.Enum):
    """How far a probe got; a reply is classified by the stage that produced it."""

    CONNECT = "connect"
    BANNER = "banner"
    EHLO = "ehlo"
    MAIL = "mail"
    RCPT = "rcpt"


class UnsendableAddress(ValueError):
    """An address that no SMTP command may carry; it is never put on the wire."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    verdict: Verdict
    stage: Stage
    code: int | None
    """The primary's reply code at ``stage``; None when there was no reply."""
    detail: str
    """The primary's reply text or the error, for logs only, never for the sender."""
    duration: float
    primary: str
    """The nexthop that gave the answer (or the last one tried)."""


def classify(stage: Stage, code: int | None) -> Verdict:
    """Map the reply at a stage to a verdict. Only RCPT TO can say valid or unknown."""
    if stage is Stage.RCPT and code is not None:
        if 200 <= code < 300:
            return Verdict.VALID
        if 500 <= code < 600:
            return Verdict.UNKNOWN
    return Verdict.TEMPFAIL


def wire_address(address: str) -> bytes:
    """The bytes of ``address`` for a ``<...>`` path, or ``UnsendableAddress``.

    Refuses anything that could end a command early or break the path: control
    characters (CR, LF, NUL…), angle brackets outside a quoted local part, non-ASCII
    (that needs SMTPUTF8, which this probe does not negotiate), and lengths over the
    RFC 5321 limits."""
    if not address:
        raise UnsendableAddress("empty address")
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        raise UnsendableAddress("control character in address")
    try:
        raw = address.encode("ascii")
    except UnicodeEncodeError:
        raise UnsendableAddress("non-ASCII address needs SMTPUTF8") from None
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise UnsendableAddress("address has no local part or no domain")
    if local.startswith('"'):
        if not _is_quoted_string(local):
            raise UnsendableAddress("malformed quoted local part")
    elif any(c in local for c in '<> "\\'):
        raise UnsendableAddress("unquoted local part holds a forbidden character")
    if any(c in domain for c in '<> "\\'):
        raise UnsendableAddress("forbidden character in domain")
    if len(local.encode()) > MAX_LOCAL_PART_OCTETS or len(raw) + 2 > MAX_PATH_OCTETS:
        raise UnsendableAddress("address longer than RFC 5321 allows")
    return raw


def _is_quoted_string(local: str) -> bool:
    """RFC 5321 Quoted-string: DQUOTE *(qtext / quoted-pair) DQUOTE, nothing after it."""
    if len(local) < 2 or not local.endswith('"'):
        return False
    inner = local[1:-1]
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\":
            i += 2
            if i > len(inner):
                return False
            continue
        if c == '"':
            return False
        i += 1
    return True


class SmtpProber:
    """Runs probes on the event loop it is awaited on. One instance serves all probes."""

    def __init__(self, *, helo_name: str, sender: str, timeout: float) -> None:
        self._helo_name = helo_name
        self._sender = sender.encode("ascii")
        self._timeout = timeout
        self._closing: set[asyncio.Task[None]] = set()

    async def probe(self, address: str, hops: Sequence[Nexthop]) -> ProbeResult:
        """Probe ``address`` at each nexthop in order until one gives a definite answer,
        all within one ``timeout``. A tempfail from one primary tries the next."""
        start = time.monotonic()
        deadline = start + self._timeout
        rcpt = wire_address(address)
        result: ProbeResult | None = None
        for hop in hops:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            result = await self._probe_one(rcpt, hop, remaining, start)
            if result.verdict is not Verdict.TEMPFAIL:
                return result
        if result is None:
            return ProbeResult(
                Verdict.TEMPFAIL,
                Stage.CONNECT,
                None,
                "no time left",
                0.0,
                str(hops[0]) if hops else "",
            )
        return result

    async def _probe_one(
        self, rcpt: bytes, hop: Nexthop, budget: float, start: float
    ) -> ProbeResult:
        smtp = aiosmtplib.SMTP(
            hostname=hop.host,
            port=hop.port,
            local_hostname=self._helo_name,
            timeout=budget,
            start_tls=False,
            use_tls=False,
        )
        stage = Stage.CONNECT
        code: int | None = None
        detail = ""
        try:
            async with asyncio.timeout(budget):
                try:
                    await smtp.connect()
                except aiosmtplib.SMTPConnectResponseError as exc:
                    stage, code, detail = Stage.BANNER, exc.code, exc.message
                    raise _Stop from None
                except (aiosmtplib.SMTPConnectTimeoutError, aiosmtplib.SMTPConnectError) as exc:
                    # The banner never came, or the connection failed or closed first.
                    stage = Stage.BANNER if smtp.protocol is not None else Stage.CONNECT
                    detail = str(exc)
                    raise _Stop from None
                stage = Stage.EHLO
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    reply = await smtp.execute_command(b"HELO", self._helo_name.encode())
                    if not 200 <= reply.code < 300:
                        code, detail = reply.code, reply.message
                        raise _Stop from None
                stage = Stage.MAIL
                reply = await smtp.execute_command(b"MAIL", b"FROM:<" + self._sender + b">")
                if not 200 <= reply.code < 300:
                    code, detail = reply.code, reply.message
                    raise _Stop
                stage = Stage.RCPT
                reply = await smtp.execute_command(b"RCPT", b"TO:<" + rcpt + b">")
                code, detail = reply.code, reply.message
        except _Stop:
            pass
        except TimeoutError:
            code, detail = None, f"timed out after {budget:.3g}s"
        except aiosmtplib.SMTPException as exc:
            code = getattr(exc, "code", None)
            code = code if isinstance(code, int) and code > 0 else None
            detail = str(exc) or type(exc).__name__
        except OSError as exc:
            code, detail = None, str(exc) or type(exc).__name__
        finally:
            self._close_later(smtp)
        verdict = classify(stage, code)
        return ProbeResult(verdict, stage, code, detail, time.monotonic() - start, str(hop))

    def _close_later(self, smtp: aiosmtplib.SMTP) -> None:
        """Say QUIT without making the caller wait for the reply."""
        if not smtp.is_connected:
            smtp.close()
            return
        task = asyncio.get_running_loop().create_task(self._quit(smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _quit(smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.quit(timeout=QUIT_TIMEOUT)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            log.debug("QUIT after probe failed: %s", exc)
        finally:
            smtp.close()

    async def aclose(self) -> None:
        """Wait for pending QUITs (at most ``QUIT_TIMEOUT``)."""
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=QUIT_TIMEOUT)


class _Stop(Exception):
    """Internal: the dialogue ended early with a reply already recorded."""
