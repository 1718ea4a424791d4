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

``python -m bench.livememory N --live`` (as root) fills the second one by probing
instead: a real Postfix primary that knows the N addresses, and each of them asked once
through the policy service (10 connections, ``bench/coldpath.py``'s requests), as a
flood of first contacts would; then both RSS figures are read the same way. A live fill
pays once for what probing itself leaves behind (the probe sessions, their buffers, the
freshness record of the last ``CALLAHEAD_POOL_MAX_AGE`` seconds, the allocator's
high-water marks), which the empty serve never did: so its RSS is also read when half the
addresses are in, and the second half's growth per address (``marginal``) is what one
more address probed live costs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import Listener, PostfixInstance, primary_main_cf
from tests.harness.waiting import wait_for

from callahead.caching import cachefile

from .coldpath import send_policy
from .memory import DOMAINS, address
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


def start_live(
    workdir: Path, n: int
) -> tuple[CallaheadProcess, PostfixInstance, float, tuple[int, int]]:
    """A serve whose cache holds N addresses, each verified by a probe of a real primary;
    and its RSS and cache size when the first half were in."""
    users = [address(i) for i in range(n)]
    pdir = workdir / "primary"
    pdir.mkdir(mode=0o755)
    main_cf = primary_main_cf(workdir=pdir, users=users, domains=DOMAINS)
    primary = PostfixInstance(pdir, main_cf, [Listener(free_port())])
    primary.start()
    process = CallaheadProcess(
        workdir,
        {
            "CALLAHEAD_ROUTES": " ".join(f"{d}=[127.0.0.1]:{primary.port}" for d in DOMAINS),
            "CALLAHEAD_CACHE_SIZE": str(n),
            "CALLAHEAD_LOG_LEVEL": "INFO",
            "CALLAHEAD_CLIENT_UNKNOWN_LIMIT": "0",
        },
        name="live",
    )
    process.start()
    started = time.monotonic()
    half = n // 2
    replies = send_policy(process.policy_port, 10, users[:half])
    wait_for(lambda: cached(process) >= half, 60.0, interval=0.5, what=f"live: {replies}")
    assert process.pid is not None
    halfway = (rss_bytes(process.pid), cached(process))
    replies += send_policy(process.policy_port, 10, users[half:])
    wait_for(lambda: cached(process) >= n, 60.0, interval=0.5, what=f"live: {replies}")
    return process, primary, time.monotonic() - started, halfway


def main(argv: list[str]) -> int:
    live = argv[1:] == ["--live"]
    if len(argv) != 1 + live or not argv[0].isdigit():
        print("usage: python -m bench.livememory N [--live]", file=sys.stderr)
        return 64
    n = int(argv[0])
    with make_workdir() as workdir:
        empty, _ = start(workdir, "empty", n, 0)
        primary: PostfixInstance | None = None
        halfway: tuple[int, int] | None = None
        if live:
            full, primary, load_seconds, halfway = start_live(workdir, n)
        else:
            full, load_seconds = start(workdir, "full", n, n)
        try:
            assert empty.pid is not None and full.pid is not None
            before, after = rss_bytes(empty.pid), rss_bytes(full.pid)
            held = cached(full)
        finally:
            full.stop()
            empty.stop()
            if primary is not None:
                primary.stop()
    figures: dict[str, object] = {
        "addresses": held,
        "filled": "probed live" if live else "loaded from a cache file",
        "rss_empty": before,
        "rss_full": after,
        "bytes_per_address": round((after - before) / held, 1),
        "load_seconds": round(load_seconds, 1),
    }
    if halfway is not None:
        rss_half, held_half = halfway
        figures["rss_half"] = rss_half
        figures["addresses_half"] = held_half
        figures["marginal"] = round((after - rss_half) / max(1, held - held_half), 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
