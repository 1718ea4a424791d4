"""Resident memory of callahead's positive cache, per cached address.

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
    for module in ("callahead.server", "callahead.cache"):
        try:
            importlib.import_module(module)
            imported.append(module)
        except ImportError as exc:  # the package may be mid-change; the cache is enough
            print(f"bench.memory: cannot import {module}: {exc}", file=sys.stderr)
    from callahead.cache import PositiveCache

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


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m bench.memory N", file=sys.stderr)
        return 64
    print(json.dumps(measure(int(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
