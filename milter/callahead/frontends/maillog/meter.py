"""The backscatter meter's metrics (docs/reference.md lists them): what became of the
recipients callahead accepted, by its reason at RCPT, and how the log reading goes."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

OUTCOMES = ("sent", "bounced", "deferred", "expired")
"""``lines.Fate``'s values."""
LINE_RESULTS = ("parsed", "ignored", "malformed")
"""``lines.Result``'s values."""
REOPEN_CAUSES = ("rotated", "truncated", "appeared")


class MaillogMetrics:
    def __init__(self, r: CollectorRegistry) -> None:
        self.outcomes = Counter(
            "callahead_relay_outcomes",
            "Recipients callahead accepted, by its reason at RCPT, and what became of them "
            "in the mail log (sent, bounced, deferred: once per recipient, expired)",
            ["reason", "outcome"],
            registry=r,
        )
        self.backscatter = Counter(
            "callahead_backscatter",
            "Recipients callahead accepted that bounced, a non-delivery notification sent "
            "to the message's sender (backscatter), by callahead's reason at RCPT",
            ["reason"],
            registry=r,
        )
        self.lines = Counter(
            "callahead_maillog_lines",
            "Mail log lines read (CALLAHEAD_MAILLOG), by result: parsed (a fate), "
            "ignored (nothing of one), malformed (not a log line: skipped)",
            ["result"],
            registry=r,
        )
        for result in LINE_RESULTS:
            self.lines.labels(result)
        self.evictions = Counter(
            "callahead_maillog_evictions",
            "Accepted recipients forgotten before their fate was read (older than the "
            "window, or beyond the most kept)",
            registry=r,
        )
        self.tracked = Gauge(
            "callahead_maillog_tracked",
            "Accepted recipients kept in memory, waiting for their fate in the mail log",
            registry=r,
        )
        self.reopens = Counter(
            "callahead_maillog_reopens",
            "Times the mail log file was opened again: rotated (a new file in its place), "
            "truncated (copytruncate), appeared (it did not exist)",
            ["cause"],
            registry=r,
        )
        self.errors = Counter(
            "callahead_maillog_errors",
            "Failures to read the mail log (retried every second)",
            registry=r,
        )

        self.cache_learned = Counter(
            "callahead_cache_learned",
            "Recipients added to the positive cache because their primary accepted them "
            "when the backup relayed a message to it (status=sent in the mail log)",
            registry=r,
        )
        self.cache_evictions = Counter(
            "callahead_cache_evictions",
            "Cached recipients removed (locally and from Redis) by cause: relay_bounce "
            "(their primary refused them as unknown when the backup relayed a message)",
            ["cause"],
            registry=r,
        )
        self.cache_evictions.labels("relay_bounce")

    def track(self, size: Callable[[], int]) -> None:
        self.tracked.set_function(lambda: float(size()))
