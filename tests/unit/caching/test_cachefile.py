"""CALLAHEAD_CACHE_FILE: saved atomically, loaded with the time left, and a bad file
refused whole (logged and ignored at start)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import pytest

from callahead.caching import cachefile
from callahead.caching.cache import PositiveCache
from callahead.caching.cachefile import CacheFileError, load, load_into, save, save_from

NOW = 1_800_000_000.0


def test_saved_entries_load_with_the_time_they_had_left(tmp_path: Path) -> None:
    path = str(tmp_path / "cache.json")
    save(path, [("a@example.com", 30.0), ("b@example.com", 90.0)], now=NOW)
    assert load(path, now=NOW + 20) == [("a@example.com", 10.0), ("b@example.com", 70.0)]
    assert load(path, now=NOW + 60) == [("b@example.com", 30.0)]  # a's TTL is over
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o640)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.json"]  # no temporary left


def test_a_save_replaces_the_old_file_whole(tmp_path: Path) -> None:
    path = str(tmp_path / "cache.json")
    save(path, [("a@example.com", 30.0)], now=NOW)
    save(path, [("b@example.com", 30.0)], now=NOW)
    assert load(path, now=NOW) == [("b@example.com", 30.0)]


def test_a_failed_save_keeps_the_old_file_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    save(str(path), [("a@example.com", 30.0)], now=NOW)
    with pytest.raises(CacheFileError, match="cannot write"):
        save(str(tmp_path / "missing-dir" / "cache.json"), [], now=NOW)
    assert load(str(path), now=NOW) == [("a@example.com", 30.0)]


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load(str(tmp_path / "none.json"))


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b'{"format": "callahead-cache", "version": 1, "entries": [["a@x', "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (b"[1, 2, 3]", "not a callahead cache file"),
        (b'{"format": "something-else", "entries": []}', "not a callahead cache file"),
        (b'{"format": "callahead-cache", "version": 2, "entries": []}', "version 2"),
        (b'{"format": "callahead-cache", "version": 1, "entries": {}}', "not a list"),
        (
            b'{"format": "callahead-cache", "version": 1, "entries": [["a@x.test", "soon"]]}',
            "entry 0",
        ),
        (b'{"format": "callahead-cache", "version": 1, "entries": [["nobody", 1e12]]}', "entry 0"),
        (
            b'{"format": "callahead-cache", "version": 1, "entries": [["a@x.test", true]]}',
            "entry 0",
        ),
    ],
)
def test_a_bad_file_is_refused_whole(tmp_path: Path, content: bytes, why: str) -> None:
    path = tmp_path / "cache.json"
    path.write_bytes(content)
    with pytest.raises(CacheFileError, match=why):
        load(str(path))


def test_load_into_ignores_a_bad_file_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"format": "callahead-cache", "version": 1, "entries": [1]}))
    cache = PositiveCache(ttl=100, maxsize=10)
    with caplog.at_level(logging.WARNING, logger="callahead.cachefile"):
        assert load_into(cache, str(path)) == 0
    assert "entry 0 is not [address, expiry]: ignored" in caplog.text
    assert len(cache) == 0
    assert load_into(cache, str(tmp_path / "absent.json")) == 0


def test_save_from_and_load_into_carry_a_cache_across_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "cache.json")
    before = PositiveCache(ttl=100, maxsize=10)
    before.add("a@example.com")
    assert save_from(before, path) is True
    after = PositiveCache(ttl=100, maxsize=10)
    assert load_into(after, path) == 1
    left = after.remaining("a@example.com")
    assert left is not None and 99 < left <= 100


def test_save_from_logs_a_failure_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = PositiveCache(ttl=100, maxsize=10)
    with caplog.at_level(logging.ERROR, logger="callahead.cachefile"):
        assert save_from(cache, str(tmp_path / "no" / "cache.json")) is False
    assert "the cache is not saved" in caplog.text


def test_a_file_too_large_to_be_ours_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cachefile, "MAX_FILE_BYTES", 10)
    path = tmp_path / "cache.json"
    path.write_text(" " * 11)
    with pytest.raises(CacheFileError, match="larger than 10 bytes"):
        load(str(path))


class SlowCache(PositiveCache):
    """A cache whose snapshot takes a while, as one of 100,000 entries does (~0.6 s)."""

    def snapshot(self) -> list[tuple[str, float]]:
        time.sleep(0.2)
        return super().snapshot()


def test_saves_after_changes_run_off_the_loop_and_are_coalesced(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    cache = SlowCache(ttl=3600, maxsize=100)
    saver = cachefile.SaveAfterChange(cache, str(path))

    async def burst() -> tuple[list[bool], float]:
        beats = 0

        async def beat() -> None:
            nonlocal beats
            while True:
                await asyncio.sleep(0.01)
                beats += 1

        ticker = asyncio.ensure_future(beat())
        started = time.monotonic()
        first = asyncio.ensure_future(saver.save())
        await asyncio.sleep(0.05)  # the first save runs; ten changes come meanwhile
        cache.add("late@example.com")
        rest = [asyncio.ensure_future(saver.save()) for _ in range(10)]
        results = await asyncio.gather(first, *rest)
        elapsed = time.monotonic() - started
        ticker.cancel()
        assert beats > 0.5 * elapsed / 0.01  # the loop went on during the saves
        return results, elapsed

    results, elapsed = asyncio.run(burst())
    assert results == [True] * 11
    assert saver.saves == 2  # the running one, then one for all ten
    assert elapsed < 1.0
    assert [a for a, _ in load(str(path))] == ["late@example.com"]  # the later change too
