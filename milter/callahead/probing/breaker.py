"""The primary-down breaker: stop waiting on a primary that is not answering.

A backup MX gets its traffic exactly when the primary is down. If every recipient then
waited the whole probe timeout on a black-holed primary, Postfix's smtpd processes would
fill up and the backup would lose its capacity during the outage it exists for. After
``failures`` consecutive connection-level failures the breaker opens: for ``cooldown``
seconds, probes to that primary are not even tried. After the cooldown one trial probe
is let through; one success closes the breaker, a failure opens it for another cooldown.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Admission(enum.Enum):
    """What ``allow`` let through; hand it back to ``record`` or ``release``."""

    PROBE = "probe"
    TRIAL = "trial"
    """The one probe that checks, after the cooldown, whether the primary is back."""


class Breaker:
    """Not thread-safe: it lives on the probe event loop. ``failures`` of 0 disables it."""

    def __init__(
        self, *, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = failures
        self._cooldown = cooldown
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._state = State.CLOSED
        self._trial_out = False

    @property
    def state(self) -> State:
        if self._state is State.OPEN and self._clock() - self._opened_at >= self._cooldown:
            return State.HALF_OPEN
        return self._state

    def allow(self) -> Admission | None:
        """May a probe go to this primary now? In half-open state only one trial may,
        until that trial's own outcome comes back."""
        state = self.state
        if state is State.CLOSED:
            return Admission.PROBE
        if state is State.HALF_OPEN and not self._trial_out:
            self._state = State.HALF_OPEN
            self._trial_out = True
            return Admission.TRIAL
        return None

    def record(self, reached: bool, admission: Admission = Admission.PROBE) -> None:
        """The outcome of a probe that ``allow`` let through as ``admission``. Any probe's
        success closes the breaker; only the trial's outcome frees the trial slot."""
        if admission is Admission.TRIAL:
            self._trial_out = False
        if reached:
            self._failures = 0
            self._state = State.CLOSED
            return
        self._failures += 1
        if self._state is State.HALF_OPEN or (
            self._threshold > 0 and self._failures >= self._threshold
        ):
            self._state = State.OPEN
            self._opened_at = self._clock()
            self._trial_out = False  # a new cooldown, then a new trial

    def release(self, admission: Admission = Admission.PROBE) -> None:
        """A probe let through ended with no outcome (cancelled, or it only waited for a
        busy pool): if it was the trial, free the trial slot."""
        if admission is Admission.TRIAL:
            self._trial_out = False
