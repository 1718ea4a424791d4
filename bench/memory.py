"""Resident memory of callahead's positive cache, per cached address, and of the client
guard, per tracked client (``python -m bench.memory --guard CLIENTS UNKNOWNS``).

``python -m bench.memory N`` runs in a fresh interpreter: it imports callahead's serving
modules (pymilter, aiosmtplib, prometheus-client...) as ``callahead serve`` does, reads
VmRSS, builds the cache callahead builds (``callahead.cache.PositiveCache`` with the
default TTL and ``maxsize = N``), adds N distinct realistic addresses (made one at a
time, so that only the cache keeps them alive), reads VmRSS again and prints one JSON
object: the RSS before and after and the growth per address.
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
import time
from typing import Any

from .tools import rss_bytes

FIRST = [
    "anna",
    "bruno",
    "carla",
    "david",
    "emma",
    "felix",
    "greta",
    "hugo",
    "irene",
    "jonas",
    "karin",
    "lukas",
    "maria",
    "nils",
    "olga",
    "paul",
    "rita",
    "stefan",
    "tina",
    "ulrich",
    "vera",
    "walter",
    "xenia",
    "yann",
    "zoe",
]
LAST = [
    "adams",
    "becker",
    "costa",
    "dubois",
    "eriksen",
    "fischer",
    "garcia",
    "hansen",
    "ivanova",
    "jensen",
    "kowalski",
    "larsen",
    "moreau",
    "nowak",
    "olsen",
    "petrov",
    "quinn",
    "rossi",
    "schmidt",
    "torres",
    "weber",
    "young",
    "zimmer",
]
DOMAINS = ("example.com", "mail.example.org", "example.net", "sub.example.co.uk")


def address(i: int) -> str:
    """A distinct address of typical length (27-45 characters)."""
    first = FIRST[i % len(FIRST)]
    last = LAST[(i // len(FIRST)) % len(LAST)]
    return f"{first}.{last}{i}@{DOMAINS[i % len(DOMAINS)]}"


def measure(n: int) -> dict[str, Any]:
    imported = []
    for module in ("callahead.process.server", "callahead.caching.cache"):
        try:
            importlib.import_module(module)
            imported.append(module)
        except ImportError as exc:  # the package may be mid-change; the cache is enough
            print(f"bench.memory: cannot import {module}: {exc}", file=sys.stderr)
    from callahead.caching.cache import PositiveCache

    gc.collect()
    before = rss_bytes()
    start = time.monotonic()
    cache = PositiveCache(ttl=86400, maxsize=n)
    for i in range(n):
        cache.add(address(i))
    fill_seconds = time.monotonic() - start
    gc.collect()
    after = rss_bytes()
    entries = len(cache)
    return {
        "addresses": n,
        "entries": entries,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_address": (after - before) / entries if entries else None,
        "mean_address_length": sum(len(address(i)) for i in range(0, n, max(1, n // 1000)))
        / len(range(0, n, max(1, n // 1000))),
        "fill_seconds": fill_seconds,
        "imported": imported,
    }


def measure_guard(n: int, unknowns: int) -> dict[str, Any]:
    """The client guard (``callahead.guard.ClientGuard``) tracking ``n`` clients, each
    with ``unknowns`` unknown recipients in the window (the default limit is 20: a
    client at the limit holds 20 timestamps, the most any client holds)."""
    importlib.import_module("callahead.process.server")
    from callahead.core.guard import ClientGuard

    gc.collect()
    before = rss_bytes()
    guard = ClientGuard(limit=unknowns, window=600, max_clients=n)
    for i in range(n):
        client = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        for _ in range(unknowns):
            guard.record_unknown(client)
    gc.collect()
    after = rss_bytes()
    return {
        "clients": len(guard),
        "unknowns_per_client": unknowns,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_client": (after - before) / len(guard) if len(guard) else None,
    }


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--guard" and argv[1].isdigit() and argv[2].isdigit():
        print(json.dumps(measure_guard(int(argv[1]), int(argv[2]))))
        return 0
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m bench.memory N | --guard CLIENTS UNKNOWNS", file=sys.stderr)
        return 64
    print(json.dumps(measure(int(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
