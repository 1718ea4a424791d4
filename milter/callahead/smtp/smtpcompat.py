"""What differs between the aiosmtplib versions callahead runs with: Debian 12's 2.0 and
the newest (3.x, 4.x). Kept here so that the probe dialogue (``session``) reads the same
for both.

A banner that is not ``220``: aiosmtplib 3.0 raises ``SMTPConnectResponseError`` (an
``SMTPConnectError`` with the reply's ``code`` and ``message``); 2.0 raises a plain
``SMTPConnectError`` whose text is the reply itself (``"421 4.3.2 Service shutting
down"``), with no cause, where every other connect failure has an ``OSError`` or
``SMTPServerDisconnected`` as its cause and a text of its own ("Error connecting to ...").
"""

from __future__ import annotations

import re

import aiosmtplib

_REPLY = re.compile(r"([2-5][0-9][0-9]) (.*)", re.DOTALL)


def banner_reply(exc: aiosmtplib.SMTPConnectError) -> tuple[int, str] | None:
    """The code and text of the banner that ``exc`` refused, or None when ``exc`` is any
    other connect failure (refused, reset, timeout, hang-up)."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):  # aiosmtplib >= 3.0
        return exc.code, exc.message
    if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError) or exc.__cause__ is not None:
        return None
    found = _REPLY.fullmatch(str(exc))
    if found is None:
        return None
    return int(found.group(1)), found.group(2)
