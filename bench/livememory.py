"""Resident memory of a running ``callahead serve`` per cached address
(``python -m bench.livememory N``).

bench/memory.py measures the cache alone in a fresh interpreter; this measures the
process an operator runs: two ``callahead serve`` (milter and policy service on, as
installed, ``CALLAHEAD_CACHE_SIZE=N``), one started with an empty cache file and one with
a cache file of N distinct addresses of typical length (bench/memory.py's), which it
loads at start as after a restart. Once the second holds all N (its
``callahead_cache_entries`` gauge), each one's VmRSS is read.
Prints one JSON object: the two RSS figures, their difference per address, and how long
the load took.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir
from tests.harness.waiting import wait_for

from callahead.caching import cachefile

from .memory import address
from .tools import rss_bytes

TTL = 86400.0


def cached(process: CallaheadProcess) -> int:
    entries = process.samples().get(("callahead_cache_entries", ()), 0.0)
    return int(entries)


def start(workdir: Path, name: str, n: int, entries: int) -> tuple[CallaheadProcess, float]:
    path = workdir / f"{name}.json"
    cachefile.save(str(path), [(address(i), TTL) for i in range(entries)])
    process = CallaheadProcess(
        workdir,
        {
            "CALLAHEAD_ROUTES": "example.test=[127.0.0.1]:9",
            "CALLAHEAD_CACHE_SIZE": str(n),
            "CALLAHEAD_CACHE_FILE": str(path),
            "CALLAHEAD_LOG_LEVEL": "INFO",
        },
        name=name,
    )
    started = time.monotonic()
    process.start()
    wait_for(lambda: cached(process) >= entries, 600.0, interval=0.5, what=f"{name} loaded")
    return process, time.monotonic() - started


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m bench.livememory N", file=sys.stderr)
        return 64
    n = int(argv[0])
    with make_workdir() as workdir:
        empty, _ = start(workdir, "empty", n, 0)
        full, load_seconds = start(workdir, "full", n, n)
        try:
            assert empty.pid is not None and full.pid is not None
            before, after = rss_bytes(empty.pid), rss_bytes(full.pid)
            held = cached(full)
        finally:
            full.stop()
            empty.stop()
    print(
        json.dumps(
            {
                "addresses": held,
                "rss_empty": before,
                "rss_full": after,
                "bytes_per_address": round((after - before) / held, 1),
                "load_seconds": round(load_seconds, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
