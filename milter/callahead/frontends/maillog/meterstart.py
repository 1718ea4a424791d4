"""The backscatter meter switched on from ``CALLAHEAD_MAILLOG``: its ledger, and the
thread that reads the mail log into it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .follow import FileFollower, Pump, Source
from .journal import JournalFollower, JournalUnavailable
from .ledger import Ledger, OnFate
from .meter import MaillogMetrics
from .tally import DomainTally

log = logging.getLogger("callahead.maillog")


@dataclass(frozen=True, slots=True)
class Meter:
    ledger: Ledger
    pump: Pump

    def stop(self) -> None:
        self.pump.stop()


def start_meter(
    setting: str,
    metrics: MaillogMetrics,
    on_fate: OnFate | None = None,
    tally: DomainTally | None = None,
) -> Meter | None:
    """None when ``setting`` is empty, or the journal cannot be read (an ERROR line
    says why; callahead serves on without the meter). ``on_fate``: the cache that learns
    (learning.Learner)."""
    if not setting:
        return None
    source: Source
    if setting == "journal":
        try:
            source = JournalFollower()
        except JournalUnavailable as exc:
            log.error("backscatter meter off: %s", exc)
            return None
    else:
        source = FileFollower(setting, metrics)
    ledger = Ledger(metrics, on_fate=on_fate, tally=tally)
    pump = Pump(source, ledger, metrics)
    pump.start()
    log.info("backscatter meter: reading %s from its end", setting)
    return Meter(ledger, pump)
