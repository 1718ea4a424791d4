"""A primary that verifies the address itself and has not finished: Postfix's
``reject_unverified_recipient`` on an edge in front of the mailbox servers.

Such an edge asks its verify(8) service, which sends a probe of its own to the mailbox
server. Until that probe is back (``address_verify_poll_count`` polls,
``address_verify_poll_delay`` apart: 3 and 3 s by default, 1 poll under stress), the
edge answers, at RCPT TO (Postfix 3.7, smtpd_check.c and verify.c, observed the same)::

    450 4.1.1 <u@example.com>: Recipient address rejected: unverified address:
    Address verification in progress

That says nothing about the recipient yet: the probe engine asks again on a new session
(probing/reask.py), where the edge answers from its verify cache, and the new reply
is judged by the ordinary rules (classify.py). This reply itself is never *unknown*,
whatever its code (``unverified_recipient_defer_code`` may be set to a 5xx).
"""

from __future__ import annotations

import re
from dataclasses import replace

from .verdict import Basis, ProbeResult, Stage, Verdict

IN_PROGRESS = "address verification in progress"
"""verify(8)'s text for an address whose probe has not come back (verify.c)."""

_QUOTED_PATH = re.compile(r"<[^<>]*>")
"""The address the reply quotes is the sender's choice: never read for the phrase."""


def verification_in_progress(result: ProbeResult) -> bool:
    """The primary's reply to RCPT TO says that its own verification of the address
    has not finished."""
    return (
        result.stage is Stage.RCPT
        and result.code is not None
        and 400 <= result.code < 600
        and IN_PROGRESS in _QUOTED_PATH.sub("<>", result.detail).lower()
    )


def still_in_progress(result: ProbeResult, asks: int) -> ProbeResult:
    """The last of ``asks`` replies still said "in progress": undecided."""
    return replace(
        result,
        verdict=Verdict.TEMPFAIL,
        basis=Basis.TEMPORARY,
        why=(
            f"the primary verifies the address itself and its verification was still in "
            f"progress after {asks} ask{'s' if asks != 1 else ''} on new sessions within "
            "the probe timeout: undecided"
        ),
    )
