"""``CALLAHEAD_CACHE_FILE``: the positive cache saved across restarts.

A restart should not make callahead probe every address again at once (a probe storm
at the primary, and a probe's wait for every sender). The file is JSON::

    {"format": "callahead-cache", "version": 1, "saved": 1764400000.0,
     "entries": [["user@example.com", 1764486400.0], ...]}

with each entry's expiry as wall-clock time (the cache itself runs on the monotonic
clock, which does not survive a reboot). It is written to a temporary file in the same
directory, flushed to disk and renamed over the old one, so a crash leaves the old file
or the new one, never half of one. Loading checks everything and refuses the whole file
on the first thing wrong (``CacheFileError``): a bad file is logged and ignored, never
fatal, and never half-loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from ..base.errors import CallaheadError

log = logging.getLogger("callahead.cachefile")
_save_lock = threading.Lock()

FORMAT = "callahead-cache"
VERSION = 1
MAX_FILE_BYTES = 256 * 1024 * 1024
"""A file larger than this is not ours (the largest cache allowed is far smaller)."""


class CacheFileError(CallaheadError):
    """The cache file cannot be read or written; the message says why."""


def save(path: str, entries: Sequence[tuple[str, float]], *, now: float | None = None) -> None:
    """Write ``entries`` (address, seconds left) to ``path`` atomically."""
    wall = time.time() if now is None else now
    document = {
        "format": FORMAT,
        "version": VERSION,
        "saved": wall,
        "entries": [[address, round(wall + left, 3)] for address, left in entries],
    }
    target = Path(path)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise CacheFileError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(document, out, separators=(",", ":"))
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o640)
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise CacheFileError(f"cannot write {path}: {exc.strerror or exc}") from None


def load(path: str, *, now: float | None = None) -> list[tuple[str, float]]:
    """The entries of ``path`` still live, as (address, seconds left).

    Raises ``FileNotFoundError`` when there is no file, ``CacheFileError`` when it is
    unreadable, truncated, corrupt or not a cache file of this version."""
    wall = time.time() if now is None else now
    try:
        with open(path, "rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CacheFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise CacheFileError(f"{path} is larger than {MAX_FILE_BYTES} bytes: not a cache file")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheFileError(f"{path} is not valid JSON (truncated or corrupt): {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CacheFileError(f"{path} is not a callahead cache file")
    if document.get("version") != VERSION:
        raise CacheFileError(
            f"{path} has version {document.get('version')!r}; this callahead reads {VERSION}"
        )
    entries = document.get("entries")
    if not isinstance(entries, list):
        raise CacheFileError(f"{path}: 'entries' is not a list")
    live: list[tuple[str, float]] = []
    for index, entry in enumerate(entries):
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or not isinstance(entry[0], str)
            or "@" not in entry[0]
            or isinstance(entry[1], bool)
            or not isinstance(entry[1], int | float)
        ):
            raise CacheFileError(f"{path}: entry {index} is not [address, expiry]")
        left = float(entry[1]) - wall
        if left > 0:
            live.append((entry[0], left))
    return live


class CacheEntries(Protocol):
    """What is saved and loaded: cache.PositiveCache."""

    def snapshot(self) -> list[tuple[str, float]]: ...

    def restore(self, entries: Iterable[tuple[str, float]]) -> int: ...


def load_into(cache: CacheEntries, path: str) -> int:
    """Load ``path`` into ``cache`` at start; returns how many entries were taken. A
    missing or bad file is logged and ignored: it is never a reason not to start."""
    try:
        entries = load(path)
    except FileNotFoundError:
        log.info("cache file %s does not exist yet: starting with an empty cache", path)
        return 0
    except CacheFileError as exc:
        log.warning("%s: ignored, starting with an empty cache", exc)
        return 0
    taken = cache.restore(entries)
    log.info("cache file %s: %d live entr%s loaded", path, taken, "y" if taken == 1 else "ies")
    return taken


def save_from(cache: CacheEntries, path: str) -> bool:
    """Save ``cache`` to ``path``; a failure is logged (the service goes on)."""
    with _save_lock:  # the last save at stop must not be overtaken by a periodic one
        entries = cache.snapshot()
        try:
            save(path, entries)
        except CacheFileError as exc:
            log.error("%s; the cache is not saved", exc)
            return False
    log.debug("cache file %s: %d entries saved", path, len(entries))
    return True


class SaveAfterChange:
    """Saves a cache after each change made on purpose (``callahead cache flush``), so
    that a crash or a watchdog abort before the next periodic save cannot bring the
    flushed entries back.

    Runs on the probe loop; the save itself (0.6 s to take a snapshot of 100,000 entries
    and 1.2-3 s to write them here) runs in a worker thread, so the loop goes on. Saves
    are coalesced: at most one runs at a time, and every change asked for while one runs
    is covered by a single next one."""

    def __init__(self, cache: CacheEntries, path: str) -> None:
        self._cache = cache
        self._path = path
        self._next: asyncio.Future[bool] | None = None
        """The save that every caller since the running one began waits for."""
        self._running: asyncio.Task[None] | None = None
        self.saves = 0
        """Saves started (for the tests)."""

    async def save(self) -> bool:
        """Returns once a save that began after this call has ended: True when it wrote
        the file (a failure is logged by ``save_from``)."""
        future = self._next
        if future is None:
            future = self._next = asyncio.get_running_loop().create_future()
            if self._running is None:
                self._start()
        return await asyncio.shield(future)

    def _start(self) -> None:
        future, self._next = self._next, None
        assert future is not None
        self.saves += 1
        self._running = asyncio.ensure_future(self._run(future))

    async def _run(self, future: asyncio.Future[bool]) -> None:
        try:
            saved = await asyncio.to_thread(save_from, self._cache, self._path)
        except BaseException:  # cancelled at shutdown: the save at stop follows
            if not future.done():
                future.set_result(False)
            raise
        finally:
            self._running = None
        if not future.done():
            future.set_result(saved)
        if self._next is not None:
            self._start()


async def save_every(cache: CacheEntries, path: str, interval: float) -> None:
    """Save ``cache`` every ``interval`` seconds, in a worker thread (the probe loop
    goes on meanwhile), until cancelled."""
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(save_from, cache, path)
