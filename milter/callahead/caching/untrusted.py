"""What callahead reads from Redis is input, not truth: whoever can write to that Redis
(each backup, and anyone else who reaches it with its password) could have written it.
So every value is checked before it is used, and what a forged one can cost is bounded:

* a valid entry holds ``1`` and has at most ``CALLAHEAD_CACHE_TTL`` left; a longer TTL
  (or none) is cut to it in Redis, so a forged entry is believed for one cache TTL at
  most, then verified again (redisstore.py's scripts check and cut);
* a probe lock holds a token of the shape callahead writes (32 hex digits) and lives at
  most a probe's time; anything else there is removed, a longer TTL cut;
* a wait on another backup's lock that ran out, or that ended without an answer that
  this backup's own probe then finds (the address valid), makes the next waits short
  (``LockTrust``), so a forged lock costs a valid recipient one Redis timeout, not
  ``CALLAHEAD_REDIS_LOCK_WAIT``, after the first;
* a control address must be an address of its domain;
* a flush message must be one that callahead publishes (``parse_flush``), and at most
  ``FLUSH_BURST`` (then ``FLUSH_RATE`` a second) are applied one by one: past that each
  one clears the local cache instead (a flush drops local copies only; the entries stay
  in Redis, so the cost of a forged one is a Redis round trip per address).

Whatever is invalid is counted (``callahead_redis_invalid_total{kind}``), logged (one
line, the value escaped; at most ``LOG_BURST`` lines per kind and ``LOG_WINDOW``, the
next line saying how many were left out), and ignored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from ..base.address import (
    MAX_ADDRESS_OCTETS,
    MAX_DOMAIN_OCTETS,
    normalize_domain,
    normalize_recipient,
)
from ..base.logfmt import escape

log = logging.getLogger("callahead.sharedcache")

INVALID_KINDS = ("entry", "lock", "control", "flush", "budget")
"""What ``callahead_redis_invalid_total`` counts: a valid entry, a probe lock, a control
address, a flush message, a site probe budget (sitebudget.py)."""
LOG_BURST = 5
LOG_WINDOW = 60.0
"""At most ``LOG_BURST`` lines per kind of invalid value in ``LOG_WINDOW`` seconds."""
SHOWN = 80
"""Characters of an invalid value shown in its log line at most."""
MAX_FLUSH_MESSAGE = 4096
"""Bytes of a flush message at most (an address of ``MAX_ADDRESS_OCTETS``, json-escaped)."""
FLUSH_BURST = 100
FLUSH_RATE = 20.0
"""Flush messages applied one by one: a burst of ``FLUSH_BURST``, then ``FLUSH_RATE`` a
second; beyond that each clears the local cache instead (cheap when it is empty)."""
WARY_FOR = 60.0
"""Seconds during which waits on another backup's lock are short, after one ended
without that backup's answer."""


class InvalidObserver(Protocol):
    def redis_invalid(self, kind: str) -> None:
        """A value read from Redis was invalid (``INVALID_KINDS``) and ignored."""


class Distrust:
    """Counts, logs (rate-limited per kind) and so ignores invalid values."""

    def __init__(
        self, observer: InvalidObserver, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._observer = observer
        self._clock = clock
        self._window: dict[str, tuple[float, int, int]] = {}  # kind: (start, logged, left out)

    def invalid(self, kind: str, message: str, *args: object) -> None:
        """Count one invalid value of ``kind``; log ``message % args`` (fields already
        escaped) unless ``LOG_BURST`` lines of that kind went out in this window."""
        self._observer.redis_invalid(kind)
        now = self._clock()
        start, logged, left_out = self._window.get(kind, (now, 0, 0))
        if now - start >= LOG_WINDOW:
            start, logged = now, 0
        if logged >= LOG_BURST:
            self._window[kind] = (start, logged, left_out + 1)
            return
        self._window[kind] = (start, logged + 1, 0)
        more = f" ({left_out} more not logged before this one)" if left_out else ""
        log.warning("redis: " + message + "%s", *args, more)


def shown(value: bytes | str) -> str:
    """An invalid value for a log line: its start, escaped, for a field in quotes."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    cut = text[:SHOWN] + ("..." if len(text) > SHOWN else "")
    return escape(cut, spaces=True)


def is_address(value: object, domain: str | None = None) -> bool:
    """``value`` is an address as callahead keeps it (normalized, printable, not too long
    for a probe), at ``domain`` if given."""
    if not isinstance(value, str) or len(value) > MAX_ADDRESS_OCTETS or not value.isprintable():
        return False
    recipient = normalize_recipient(value)
    return (
        recipient is not None
        and recipient.address == value.strip()  # an internal form may start with a space
        and (domain is None or recipient.domain == domain)
    )


def is_domain(value: object) -> bool:
    """``value`` is a domain as callahead keeps it (normalized)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_DOMAIN_OCTETS
        and value.isprintable()
        and not any(c in value for c in " @<>")
        and normalize_domain(value) == value
    )


def parse_flush(data: object) -> tuple[str, str] | None:
    """A flush message as callahead publishes it: ``("all", "")``, ``("domain", D)`` or
    ``("address", A)``; None for anything else."""
    if not isinstance(data, bytes | str) or len(data) > MAX_FLUSH_MESSAGE:
        return None
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(message, dict) or len(message) != 1:
        return None
    ((key, value),) = message.items()
    if key == "all" and value is True:
        return ("all", "")
    if key == "domain" and is_domain(value):
        return ("domain", value)
    if key == "address" and is_address(value):
        return ("address", value)
    return None


class FlushBudget:
    """A token bucket: ``take()`` is False once the flush messages come faster than
    ``FLUSH_BURST`` and ``FLUSH_RATE`` allow."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens = float(FLUSH_BURST)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(float(FLUSH_BURST), self._tokens + (now - self._at) * FLUSH_RATE)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class LockTrust:
    """How long a recipient waits on another backup's probe lock: in full
    (``CALLAHEAD_REDIS_LOCK_WAIT``), or ``short`` (the Redis timeout) for ``WARY_FOR``
    seconds after a wait longer than ``short`` that showed the lock was not what it
    claims to be, or until a wait ends with an answer again.

    What shows it: a forged lock of the right shape is held until its TTL runs out
    (the scripts cap it at a probe's time), and then there is no answer behind it. So a
    wait that runs out with the lock still held (``timeout``) counts; so does a wait
    that ends with the lock gone (``released``) when this backup's own probe then finds
    the address valid (``probed_after_release``): the lock ran out, or was let go,
    without the answer that exists. A lock let go without an answer for an address
    this backup then finds unknown or undecided is the other backup's probe finding
    the same (those answers are never stored): the normal end of a wait on an unknown
    recipient, as in a dictionary run, and no reason to stop waiting for the valid
    ones."""

    def __init__(
        self, full: float, short: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.full = full
        self.short = min(full, short)
        self._clock = clock
        self._wary_until = 0.0

    def limit(self) -> float:
        return self.short if self._clock() < self._wary_until else self.full

    def ended(self, outcome: str, waited: float) -> None:
        """A wait ended with ``outcome`` (``shared``, ``released``, ``timeout``,
        ``error``) after ``waited`` seconds. ``released`` is judged once this backup's
        own probe has answered (``probed_after_release``)."""
        if outcome == "shared":
            self._wary_until = 0.0
        elif outcome == "timeout":
            self._distrust(waited)

    def probed_after_release(self, valid: bool, waited: float) -> None:
        """This backup's own probe, after a wait of ``waited`` seconds that ended with
        the lock gone and no answer, found the address ``valid`` (or not)."""
        if valid:
            self._distrust(waited)

    def _distrust(self, waited: float) -> None:
        if waited > self.short:
            self._wary_until = self._clock() + WARY_FOR
