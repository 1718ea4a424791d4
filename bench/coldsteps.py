"""CPU of single steps of the cold path, in process (``python -m bench.coldsteps``).

For the cuts of bench/RESULTS-coldpath.md, each too small to see through the whole
process on a shared machine: ``classify`` of a Postfix 550 5.1.1, ``wire_address`` of a
typical address, ``escape`` of that reply, and one milter hand-off (``LoopProber.probe``
from a plain thread, to an engine that answers at once). Prints µs per call (the
fastest of many repeats; the hand-off as process CPU time, both threads). Compare an
older checkout by running it alternately with ``PYTHONPATH=DIR/milter``.
"""

from __future__ import annotations

import sys
import time
import timeit
from collections.abc import Callable, Sequence

from tests.unit.settings import probe_settings

from callahead.base.address import wire_address
from callahead.base.logfmt import escape
from callahead.probing.engine import ProbeEngine
from callahead.probing.loop import LoopProber, ProbeLoop
from callahead.routing.routes import Nexthop
from callahead.smtp.classify import classify
from callahead.smtp.verdict import ProbeResult, Stage, Verdict

REPLY = "5.1.1 <r0pu12@a.test>: Recipient address rejected: User unknown in virtual mailbox table"
ADDRESS = "r0pu12@a.test"
HOPS = (Nexthop("127.0.0.1", 25),)
ANSWER = ProbeResult(Verdict.VALID, Stage.RCPT, 250, "2.1.5 Ok", 0.0, "[127.0.0.1]:25")


class InstantEngine(ProbeEngine):
    async def probe(self, address: str, hops: Sequence[Nexthop], **_: object) -> ProbeResult:
        return ANSWER


def per_call(step: Callable[[], object], number: int = 4000, repeat: int = 25) -> float:
    return min(timeit.repeat(step, number=number, repeat=repeat)) / number


def handoff(n: int = 20000) -> float:
    loop = ProbeLoop()
    loop.start()
    try:
        prober = LoopProber(loop, InstantEngine(probe_settings()), wait=30.0)
        for _ in range(2000):
            prober.probe(ADDRESS, HOPS)
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for _ in range(n):
                prober.probe(ADDRESS, HOPS)
            best = min(best, (time.process_time() - started) / n)
        return best
    finally:
        loop.stop()


def main() -> int:
    figures = {
        "classify_550": per_call(lambda: classify(Stage.RCPT, 550, REPLY)),
        "wire_address": per_call(lambda: wire_address(ADDRESS, allow_utf8=True)),
        "escape_reply": per_call(lambda: escape("550 " + REPLY, spaces=True)),
        "milter_handoff": handoff(),
    }
    print(" ".join(f"{k}={v * 1e6:.2f}us" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
