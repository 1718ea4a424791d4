"""Wait for a condition instead of sleeping: ``wait_for`` in a thread, ``wait_until`` in a
coroutine (it awaits between the calls, so that the loop goes on)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a truthy value.

    Returns that value. Raises ``TimeoutError`` when ``timeout`` seconds pass first.
    The predicate is always called at least once, and once more at the deadline.
    Exceptions raised by the predicate propagate unchanged.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(min(interval, remaining))


async def wait_until(
    predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.01, what: str = ""
) -> float:
    """Await until ``predicate()`` is truthy; returns the seconds waited. Raises
    ``TimeoutError`` when ``timeout`` seconds pass first."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)
    return time.monotonic() - started
