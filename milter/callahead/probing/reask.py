"""Asking again a primary that verifies the address itself (smtp/verifying.py): a
Postfix edge with ``reject_unverified_recipient`` answers ``450 4.1.1 ... unverified
address: Address verification in progress`` until its own probe of the mailbox server
is back, and from its verify cache after that.

So after such a reply the probe asks again, on a *new* session (one opened after the
reply: the edge's answer then comes from its cache), after a pause, within the probe's
own deadline, and at most ``len(PAUSES)`` times. The last reply is judged by the
ordinary rules: a 250 is valid, the edge's ``550 5.1.1 ... undeliverable address: ...
User unknown ...`` is unknown, anything else what it always is. A new ask that gets no
reply (no session in time, a timeout, a lost session) ends the asking and the earlier
reply stands; a reply that still says "in progress" is undecided, whatever its code.
Never a 550 that the primary did not give.

The pauses grow to Postfix's own ``address_verify_poll_delay`` (3 s): an edge probe
takes tens of milliseconds on a LAN, seconds when the mailbox server is slow; the new
ask is made only if ``ASK_RESERVE`` seconds are left for it after its pause, so no
pause runs past the deadline. A default edge (``address_verify_poll_count = 3``) has
already waited up to 6 s itself before it said "in progress"; under stress (1 poll) it
says so at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from ..base.logfmt import escape
from ..smtp.verdict import ProbeResult
from ..smtp.verifying import still_in_progress, verification_in_progress

log = logging.getLogger("callahead.engine")

PAUSES = (1.0, 2.0, 3.0)
"""The pause before each new ask: at most 3 more asks (4 sessions) per probe."""
ASK_RESERVE = 1.0
"""Seconds a new ask must have after its pause (a connection, EHLO, MAIL, RCPT)."""

S = TypeVar("S")
Ask = Callable[[float], Awaitable[tuple[ProbeResult, S]]]
"""Ask on a session opened after the given moment (monotonic): the result and the
session that gave it."""


async def ask_while_verifying(
    first: ProbeResult,
    session: S,
    ask: Ask[S],
    deadline: float,
    address: str,
) -> tuple[ProbeResult, S]:
    """``first`` (given by ``session``) and, while the primary's reply says its own
    verification is in progress, new asks (``ask``) until ``deadline``: the result to
    judge and the session that gave it."""
    result, held = first, session
    asks = 1
    answered_at = time.monotonic()
    for pause in PAUSES:
        if not verification_in_progress(result):
            return result, held
        if answered_at + pause + ASK_RESERVE > deadline:
            break
        log.debug(
            "%s verifies %s itself (in progress); asking again in %gs on a new session",
            escape(result.primary),
            escape(address),
            pause,
        )
        await asyncio.sleep(pause)
        again, again_session = await ask(answered_at)
        asks += 1
        if again.code is None:  # no reply at all: the reply before it stands
            break
        result, held = again, again_session
        answered_at = time.monotonic()
    if not verification_in_progress(result):
        return result, held
    waited = time.monotonic() - answered_at
    return still_in_progress(replace(result, duration=result.duration + waited), asks), held
