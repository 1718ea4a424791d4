"""When each address was last judged, so that its next probe asks a current primary.

A primary session opened before a user was added keeps answering "unknown" for that
user (Postfix's smtpd keeps the tables it had when the connection began). So the next
probe of an address must run on a session opened *after* the address was last judged:
after a 550, a user added on the primary is accepted at the next RCPT; after a cache
entry expires, the re-verification sees the primary as it is now.

Sessions live at most ``max_age`` seconds, so a judgment older than that is older than
every open session and need not be kept: entries expire after ``max_age``. When more
than ``maxsize`` addresses were judged within ``max_age``, the oldest are dropped and
their time becomes a watermark that every address not listed must be younger than:
never less strict, only fewer sessions reused. This remembers *when*, never *what*: a
"no" is still never reused.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class LastJudged:
    """Not thread-safe: it lives on the probe event loop."""

    def __init__(
        self,
        max_age: float,
        *,
        maxsize: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_age = max_age
        self._maxsize = maxsize
        self._clock = clock
        self._times: OrderedDict[str, float] = OrderedDict()
        self._watermark = float("-inf")

    def __len__(self) -> int:
        return len(self._times)

    def record(self, address: str) -> None:
        """``address`` has just been judged (valid or unknown)."""
        now = self._clock()
        self._times[address] = now
        self._times.move_to_end(address)
        self._expire(now)
        while len(self._times) > self._maxsize:
            _, dropped = self._times.popitem(last=False)
            self._watermark = max(self._watermark, dropped)

    def since(self, address: str) -> float:
        """The moment after which a session must have been opened to judge ``address``."""
        self._expire(self._clock())
        return self._times.get(address, self._watermark)

    def _expire(self, now: float) -> None:
        horizon = now - self._max_age
        times = self._times
        while times:
            address, judged = next(iter(times.items()))
            if judged >= horizon:
                break
            del times[address]
        if self._watermark < horizon:
            self._watermark = float("-inf")
