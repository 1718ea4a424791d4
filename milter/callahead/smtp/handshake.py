"""Opening an SMTP session: EHLO (HELO when EHLO is refused) and STARTTLS per the TLS
mode, as Postfix's own smtp client opens one. A reply that ends the opening raises what
``fail`` makes of it (the session's ``SessionFailed``).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiosmtplib
from aiosmtplib.typing import SMTPStatus

from .dialogue import Dialogue
from .tls import TlsMode, unverified_tls_context
from .verdict import Stage

if TYPE_CHECKING:
    from .session import SessionSettings

Fail = Callable[[Stage, int | None, str], Exception]
"""The session's failure for a stage, a reply code (None: no reply) and a detail."""


async def greet(smtp: aiosmtplib.SMTP, helo: str, dialogue: Dialogue, fail: Fail) -> None:
    """EHLO, or HELO when EHLO is refused (not with 421 or a closed connection)."""
    dialogue.said(f"EHLO {helo}")
    try:
        reply = await smtp.ehlo()
        dialogue.heard(reply.code, reply.message)
    except aiosmtplib.SMTPHeloError as exc:
        dialogue.heard(exc.code, exc.message)
        if exc.code == SMTPStatus.domain_unavailable or not smtp.is_connected:
            raise fail(Stage.EHLO, exc.code, exc.message) from None
        reply = await dialogue.command(smtp, b"HELO", helo.encode("ascii"))
        if not 200 <= reply.code < 300:
            raise fail(Stage.EHLO, reply.code, reply.message) from None


async def starttls(
    smtp: aiosmtplib.SMTP, settings: SessionSettings, host: str, dialogue: Dialogue, fail: Fail
) -> None:
    """STARTTLS per the TLS mode (``may``: plaintext when it is not offered or refused,
    as Postfix does), then EHLO again."""
    offered = smtp.supports_extension("starttls")
    if not offered:
        if settings.tls is TlsMode.ENCRYPT:
            raise fail(Stage.STARTTLS, None, "STARTTLS not offered")
        return
    dialogue.said("STARTTLS")
    try:
        reply = await smtp.starttls(
            tls_context=settings.tls_context or unverified_tls_context(),
            server_hostname=host,
        )
        dialogue.heard(reply.code, reply.message)
    except aiosmtplib.SMTPResponseException as exc:
        dialogue.heard(exc.code, exc.message)
        if (
            settings.tls is TlsMode.ENCRYPT
            or exc.code == SMTPStatus.domain_unavailable
            or not smtp.is_connected
        ):
            raise fail(Stage.STARTTLS, exc.code, exc.message) from None
        return  # "may": carry on in plaintext, as Postfix does
    except (ssl.SSLError, OSError, aiosmtplib.SMTPException) as exc:
        # A failed handshake is a connection-level failure of this primary.
        raise fail(Stage.STARTTLS, None, f"TLS handshake failed: {exc}") from None
    dialogue.note("TLS handshake done")
    await greet(smtp, settings.helo_name, dialogue, fail)
