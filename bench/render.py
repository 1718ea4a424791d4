"""The Markdown report: targets, throughput, latency, connections, CPU and memory."""

from __future__ import annotations

import datetime
import importlib.metadata
import operator
import os
import platform
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tests.harness.postfix import POSTCONF

from .plan import MESSAGE_SIZE, sessions, warm_count
from .report import Delta, Report, Throughput, loadavg, percentile
from .stack import (
    CALLAHEAD,
    CASES,
    FLOORS,
    GUARD,
    NULL_POLICY,
    PLAIN,
    POLICY,
    PRIMARIES,
    REPO,
    TRIVIAL,
    VERIFY,
)

if TYPE_CHECKING:
    from .stack import Case, PrimarySpec


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table: the header, its rule and one line per row; every table of the
    report is written by this. A ``|`` inside a cell is escaped; a row of another width
    than the header is an error."""

    def line(row: Sequence[str]) -> str:
        if len(row) != len(header):
            raise ValueError(f"table row of {len(row)} cells under {len(header)} columns: {row}")
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def section(
    title: str, text: str, header: Sequence[str], rows: Iterable[Sequence[str]]
) -> list[str]:
    """A section of the report: its heading, the paragraph that says what its figures
    are, and their table."""
    return [f"## {title}", "", text, "", *table(header, rows)]


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def fmt_bytes(value: float) -> str:
    return f"{value / 1048576:.1f} MiB"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _cmd(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return ""
    return proc.stdout.strip()


def environment() -> list[str]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    head = _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]) or "?"
    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "milter"])
    git = f"git {head}" + (" + uncommitted changes in milter/" if dirty else "")
    postfix = _cmd([POSTCONF, "-d", "-h", "mail_version"]) or "?"
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return [
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {len(os.sched_getaffinity(0))} cores (nproc), {model or 'unknown CPU'}, "
        f"{mem_kib / 1048576:.1f} GiB RAM, Linux {platform.release()}",
        f"versions: Postfix {postfix}, Python {platform.python_version()}, "
        f"pymilter {_version('pymilter')}, aiosmtplib {_version('aiosmtplib')}, "
        f"cachetools {_version('cachetools')}, prometheus-client "
        f"{_version('prometheus-client')}, callahead {_version('callahead')} ({git})",
    ]


def ratio(report: Report, item: Throughput, to: Case = PLAIN) -> float | None:
    """The median msg/s of ``item`` over that of case ``to`` (plain Postfix, or the
    front end's do-nothing floor) in the same workload and runs."""
    base = report.find(item.workload, item.spec, to)
    if base is None or not base.median or item.median is None:
        return None
    return item.median / base.median


def spread(item: Throughput) -> str:
    """The lowest and highest run, when there are several."""
    if len(item.runs) < 2:
        return ""
    rates = [r.rate for r in item.runs]
    return f" [{fmt_rate(min(rates))}-{fmt_rate(max(rates))}]"


def render_throughput(report: Report) -> list[str]:
    s = report.settings
    text = (
        f"Median of {s.runs} runs, [lowest-highest run]; in round brackets the ratio of the "
        "medians to case 1 (plain Postfix) measured in this same benchmark, whose runs "
        "alternate the cases (in a rotating order), and for callahead's front ends the "
        "ratio to their do-nothing floor (2t for the milter, 2pt for the policy service). "
        "One message per SMTP "
        f"session, {MESSAGE_SIZE} bytes, one recipient, {s.sessions} concurrent sessions; "
        f"each run stops after its message count or {s.run_deadline:g} s (marked †: then "
        "the rate is the messages done over the deadline)."
    )
    columns: tuple[Case, ...] = CASES + tuple(
        extra
        for extra in (GUARD, TRIVIAL, NULL_POLICY)
        if any(item.case is extra and item.runs for item in report.throughput)
    )
    header = [
        "workload",
        "primary `in_flow_delay`",
        "load",
        f"messages per run ({' / '.join(case.label for case in columns)})",
        *(case.name for case in columns),
    ]
    rows: list[list[str]] = []
    seen: list[tuple[str, PrimarySpec]] = []
    for item in report.throughput:
        if (item.workload, item.spec) not in seen:
            seen.append((item.workload, item.spec))
    for workload, spec in seen:
        cells = []
        planned = []
        load = ""
        for case in columns:
            found = report.find(workload, spec, case)
            if found is None or not found.runs:
                cells.append("-")
                planned.append("-")
                continue
            load = found.load
            planned.append(str(found.planned))
            cell = fmt_rate(found.median) + (" †" if found.bounded else "") + spread(found)
            r = ratio(report, found)
            floor = FLOORS.get(case)
            to_floor = None if floor is None else ratio(report, found, floor)
            if case is not PLAIN and r is not None:
                cell += f" ({r:.2f}" + (
                    f"; {to_floor:.2f} of {floor.label})"
                    if floor is not None and to_floor is not None
                    else ")"
                )
            cells.append(cell)
        primary = "- (no probes)" if workload == "warm" else spec.label
        rows.append([workload, primary, load, " / ".join(planned), *cells])
    out = section("Messages per second", text, header, rows)
    out += ["", "Every run (msg/s):", ""]
    for item in report.throughput:
        if item.runs:
            runs = ", ".join(
                fmt_rate(r.rate) + (f" († {r.messages} msgs)" if r.timed_out else "")
                for r in item.runs
            )
            replies = (
                "; replies " + ", ".join(f"{k}: {v}" for k, v in sorted(item.replies.items()))
                if item.replies
                else ""
            )
            out.append(
                f"- {item.workload}, primary {item.spec.label}, {item.case.name}: {runs}{replies}"
            )
    return out


def render_latency(report: Report) -> list[str]:
    header = ["case", "primary `in_flow_delay`", "address", "sessions", "samples"]
    rows: list[list[str]] = []
    for item in report.latency:
        first = [item.case.name, item.spec.label, item.kind, str(item.sessions)]
        if not item.seconds:
            rows.append([*first, f"0 of {item.planned}", "-", "-", "-", f"{item.errors} errors"])
            continue
        replies = ", ".join(f"{code}: {n}" for code, n in sorted(item.replies.items()))
        if item.errors:
            replies += f", {item.errors} failed sessions"
        rows.append(
            [
                *first,
                str(len(item.seconds)),
                fmt_seconds(percentile(item.seconds, 50)),
                fmt_seconds(percentile(item.seconds, 99)),
                fmt_seconds(max(item.seconds)),
                replies,
            ]
        )
    return section(
        "First-contact decision time",
        "Time from writing `RCPT TO` to the whole reply, for addresses the backup has never "
        "seen, one RCPT per SMTP session, valid and unknown addresses interleaved.",
        [*header, "p50", "p99", "max", "replies"],
        rows,
    )


@dataclass
class ConnRow:
    case: Case
    spec: PrimarySpec
    workload: str
    probes: int
    connects: int

    @property
    def per100(self) -> float | None:
        return 100 * self.connects / self.probes if self.probes else None


def connection_rows(report: Report) -> list[ConnRow]:
    rows: list[ConnRow] = []

    def probes_of(case: Case, delta: Delta) -> int:
        return delta.verify_probes if case is VERIFY else sum(delta.probes.values())

    for item in report.throughput:
        if item.case is not PLAIN and item.workload != "warm" and item.runs:
            rows.append(
                ConnRow(
                    item.case,
                    item.spec,
                    item.workload,
                    probes_of(item.case, item.delta),
                    item.delta.primary_connects,
                )
            )
    for lat in report.latency:
        if lat.delta is not None and lat.case is not PLAIN:
            rows.append(
                ConnRow(
                    lat.case,
                    lat.spec,
                    f"first contact, {sessions(lat.sessions)}",
                    probes_of(lat.case, lat.delta),
                    lat.delta.primary_connects,
                )
            )
    return rows


def render_connections(report: Report) -> list[str]:
    header = ["case", "primary `in_flow_delay`", "workload", "probes", "new connections"]
    rows = [
        [
            row.case.name,
            row.spec.label,
            row.workload,
            str(row.probes),
            str(row.connects),
            "-" if row.per100 is None else f"{row.per100:.1f}",
        ]
        for row in connection_rows(report)
    ]
    return section(
        "New connections to the primary per 100 probes",
        "Connections counted at the primary (`connect from` in its maillog); probes counted "
        "by callahead (`callahead_probes_total`) for case 2 and as the backup's delivery "
        "attempts to the primary for case 3 (Postfix probes an unknown address three times "
        "per RCPT).",
        [*header, "per 100 probes"],
        rows,
    )


CPU_PROCESS = {
    PLAIN: "case 2's callahead, idle",
    CALLAHEAD: "callahead",
    POLICY: "callahead",
    GUARD: "the second callahead",
    TRIVIAL: "bench.trivial_milter",
    NULL_POLICY: "bench.trivial_policy",
}
"""The process whose CPU each case's rows show (``Stack.cpu_pid``)."""


def cpu_per_message(report: Report, workload: str, spec: PrimarySpec, case: Case) -> float | None:
    """CPU seconds per completed message of the process behind ``case`` in its runs of
    ``workload`` (warm runs are on the first primary only)."""
    item = report.find(workload, spec, case)
    if item is None or not item.messages:
        return None
    return item.delta.cpu / item.messages


def render_cpu(report: Report) -> list[str]:
    header = ["case", "process", "workload", "primary `in_flow_delay`", "messages", "CPU seconds"]
    rows: list[list[str]] = []
    for item in report.throughput:
        if item.case in CPU_PROCESS and item.messages:
            per = item.delta.cpu / item.messages
            primary = "- (no probes)" if item.workload == "warm" else item.spec.label
            rows.append(
                [
                    item.case.name,
                    CPU_PROCESS[item.case],
                    item.workload,
                    primary,
                    str(item.messages),
                    f"{item.delta.cpu:.2f}",
                    f"{per * 1e6:.0f} µs",
                ]
            )
    return section(
        "CPU time per message of the process behind each case",
        "utime + stime of one process (all its threads, from /proc/PID/stat) from just "
        "before each run of the case to the end of the drain after it, summed over the "
        "case's runs and divided by the messages (sessions for attack) completed in them. "
        "2 and 2p are the same callahead process, measured apart in their own runs (the "
        "runs follow one another); 2t and 2pt are the floors' own processes; for 1 it is "
        "case 2's callahead while it has nothing to do (no message reaches it): its "
        "background work, which every other figure of it includes too.",
        [*header, "CPU per message"],
        rows,
    )


def render_memory(report: Report) -> list[str]:
    header = ["cached addresses", "mean address length", "RSS before", "RSS after"]
    rows: list[list[str]] = []
    for m in report.memory:
        per = m["bytes_per_address"]
        rows.append(
            [
                f"{int(str(m['entries'])):,}",
                f"{float(str(m['mean_address_length'])):.1f}",
                fmt_bytes(float(str(m["rss_before"]))),
                fmt_bytes(float(str(m["rss_after"]))),
                "-" if per is None else f"{float(str(per)):.0f}",
                f"{float(str(m['fill_seconds'])):.1f} s",
            ]
        )
    out = section(
        "Resident memory of the positive cache",
        "`python -m bench.memory N` in a fresh interpreter: imports callahead's serving "
        "modules, reads VmRSS, fills `callahead.cache.PositiveCache(ttl=86400, maxsize=N)` "
        "with N distinct addresses of typical length, reads VmRSS again.",
        [*header, "bytes per cached address", "fill time"],
        rows,
    )
    if report.live_memory:
        live = report.live_memory
        out += [
            "",
            f"The running callahead at the end of the load: RSS "
            f"{fmt_bytes(live['rss'])} with {live['entries']:.0f} cached addresses.",
        ]
    return out


@dataclass(frozen=True)
class Reading:
    """One measurement of a figure: which one (``where``), its value and how it is written."""

    where: str
    value: float | None
    text: str


@dataclass(frozen=True)
class Figure:
    """A figure of the report that targets read: its measurements, and how a threshold
    in its unit is written."""

    read: Callable[[Report], list[Reading]]
    bound: Callable[[float], str]


def _ratio_to_plain(workload: str, case: Case, specs: Sequence[PrimarySpec]) -> Figure:
    """Median msg/s of a case over plain Postfix's, per primary."""
    return _ratio(workload, case, PLAIN, specs)


def _ratio_to_floor(workload: str, case: Case) -> Figure:
    """Median msg/s of a front end over its do-nothing floor's, per primary."""
    return _ratio(workload, case, FLOORS[case], PRIMARIES)


def _ratio(workload: str, case: Case, to: Case, specs: Sequence[PrimarySpec]) -> Figure:
    def read(report: Report) -> list[Reading]:
        readings = []
        for spec in specs:
            item = report.find(workload, spec, case)
            if item is None or not item.runs:
                continue
            r = ratio(report, item, to)
            where = "" if workload == "warm" else f", primary {spec.label}"
            readings.append(Reading(where, r, "-" if r is None else f"{r:.2f}"))
        return readings

    return Figure(read, lambda v: f"{v:.2f}")


def _first_contact_p99(case: Case, sessions_at_least: int = 1) -> Figure:
    """First-contact decision time of a case, p99, per latency measurement."""

    def read(report: Report) -> list[Reading]:
        readings = []
        for lat in report.latency:
            if lat.seconds and lat.case is case and lat.sessions >= sessions_at_least:
                p99 = percentile(lat.seconds, 99)
                where = f"{lat.kind}, primary {lat.spec.label}, {sessions(lat.sessions)}"
                readings.append(Reading(where, p99, fmt_seconds(p99)))
        return readings

    return Figure(read, lambda v: f"{v * 1000:g} ms")


def _first_contact_spread(case: Case, kinds: Sequence[str], where: str) -> Figure:
    """First-contact decision time of a case, p50 and p99, per latency measurement of
    the given address kinds; ``where`` is formatted with the measurement's ``kind``,
    ``primary`` and ``sessions``."""

    def read(report: Report) -> list[Reading]:
        readings = []
        for lat in report.latency:
            if lat.seconds and lat.case is case and lat.kind in kinds:
                p99 = percentile(lat.seconds, 99)
                text = f"p50 {fmt_seconds(percentile(lat.seconds, 50))}, p99 {fmt_seconds(p99)}"
                at = where.format(
                    kind=lat.kind, primary=lat.spec.label, sessions=sessions(lat.sessions)
                )
                readings.append(Reading(at, p99, text))
        return readings

    return Figure(read, lambda v: f"{v * 1000:g} ms")


def _floors_to_plain() -> Figure:
    def read(report: Report) -> list[Reading]:
        readings = []
        for floor in (TRIVIAL, NULL_POLICY):
            item = report.find("warm", PRIMARIES[0], floor)
            if item is not None and item.runs:
                r = ratio(report, item)
                readings.append(
                    Reading(floor.label, r, "-" if r is None else f"{floor.label} {r:.2f}")
                )
        return readings

    return Figure(read, lambda v: f"{v:.2f}")


def _cold_connections_per_100(report: Report) -> list[Reading]:
    """New connections to the primary per 100 probes, callahead, cold, per primary."""
    return [
        Reading(f"{row.case.label}, primary {row.spec.label}", row.per100, f"{row.per100:.1f}")
        for row in connection_rows(report)
        if row.case in (CALLAHEAD, POLICY) and row.workload == "cold" and row.per100 is not None
    ]


def _bytes_per_cached_address(report: Report) -> list[Reading]:
    """RSS per cached address with 1,000,000 addresses in the positive cache."""
    readings = []
    for m in report.memory:
        if m["entries"] == 1_000_000 and m["bytes_per_address"] is not None:
            per = float(str(m["bytes_per_address"]))
            readings.append(Reading("", per, f"{per:.0f}"))
    return readings


Comparison = Literal["≥", "≤", "<"]

COMPARISONS: dict[Comparison, Callable[[float, float], bool]] = {
    "≥": operator.ge,
    "≤": operator.le,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Target:
    """A row of the report's targets table. ``name`` gets ``{bound}`` (the comparison and
    the threshold) and ``{where}`` (which reading of the figure) filled in. Without a
    comparison the figure is shown for comparison only, with no verdict."""

    name: str
    figure: Figure
    comparison: Comparison | None = None
    threshold: float = 0.0

    def met(self, value: float | None) -> str:
        if self.comparison is None:
            return ""
        if value is None:
            return "-"
        return "yes" if COMPARISONS[self.comparison](value, self.threshold) else "**no**"

    @property
    def bound(self) -> str:
        """The comparison and the threshold, e.g. ``≥ 0.80``; empty for comparison only."""
        if self.comparison is None:
            return ""
        return f"{self.comparison} {self.figure.bound(self.threshold)}"

    def rows(self, report: Report) -> list[list[str]]:
        return [
            [self.name.format(bound=self.bound, where=r.where), r.text, self.met(r.value)]
            for r in self.figure.read(report)
        ]


def _extra(
    name: str, pick: Callable[[Any], list[tuple[str, float | None]]], unit: str = ""
) -> Figure:
    """A figure from one of the separate drivers' JSON (``Report.extras``): ``pick``
    gives (where, value) pairs; none when the driver did not run."""

    def read(report: Report) -> list[Reading]:
        data = report.extras.get(name)
        if data is None:
            return []
        return [
            Reading(where, value, "-" if value is None else f"{value:g}{unit}")
            for where, value in pick(data)
        ]

    return Figure(read, lambda threshold: f"{threshold:g}{unit}")


def _policy_cpu(server: str, key: str) -> Callable[[Any], list[tuple[str, float | None]]]:
    def pick(data: Any) -> list[tuple[str, float | None]]:
        return [("", float(x[key])) for x in data if x["server"] == server]

    return pick


def _flood(key: str, cases: Sequence[str]) -> Callable[[Any], list[tuple[str, float | None]]]:
    def pick(data: Any) -> list[tuple[str, float | None]]:
        out: list[tuple[str, float | None]] = []
        for entry in data["cases"]:
            label = str(entry["case"]).split(" ", 1)[0]
            if label in cases:
                value = entry[key]
                out.append((f" ({entry['case']})", None if value is None else float(value)))
        return out

    return pick


def _flood_made_up_250(data: Any) -> list[tuple[str, float | None]]:
    return [
        (f" ({e['case']})", float(e["unknown_replies"].get("250", 0)))
        for e in data["cases"]
        if str(e["case"]).split(" ", 1)[0] in ("2g", "2", "2p")
    ]


def _first_contact(
    labels: Sequence[str], sessions: int
) -> Callable[[Any], list[tuple[str, float | None]]]:
    """bench.firstcontact's p99 (ms) at ``sessions`` concurrent sessions, per case and
    address kind."""

    def pick(data: Any) -> list[tuple[str, float | None]]:
        return [
            (f"{e['case']}, {e['kind']}", float(e["p99_ms"]))
            for e in data["cases"]
            if str(e["case"]).split(" ", 1)[0] in labels and e["sessions"] == sessions
        ]

    return pick


def _live_memory(
    key: str, say_count: bool = False
) -> Callable[[Any], list[tuple[str, float | None]]]:
    """bench.livememory's ``key``; ``say_count``: the reading names how many addresses."""

    def pick(data: Any) -> list[tuple[str, float | None]]:
        value = data.get(key)
        where = f", {int(data['addresses']):,} addresses" if say_count else ""
        return [] if value is None else [(where, float(value))]

    return pick


def _cold_cpu(case: Case) -> Figure:
    """CPU per cold message of the process behind ``case`` (ms), per primary."""

    def read(report: Report) -> list[Reading]:
        readings = []
        for spec in PRIMARIES:
            per = cpu_per_message(report, "cold", spec, case)
            if per is not None:
                readings.append(
                    Reading(f", primary {spec.label}", per * 1e3, f"{per * 1e3:.2f} ms")
                )
        return readings

    return Figure(read, lambda v: f"{v:g} ms")


def _warm_cpu_of_floor(case: Case) -> Figure:
    """CPU per warm message of callahead behind ``case`` over its floor's, measured in
    the same warm runs."""
    floor = FLOORS[case]

    def read(report: Report) -> list[Reading]:
        own = cpu_per_message(report, "warm", PRIMARIES[0], case)
        base = cpu_per_message(report, "warm", PRIMARIES[0], floor)
        if own is None or base is None:
            return []
        r = own / base if base > 0 else None
        text = (
            f"{own * 1e3:.2f} ms against {floor.label}'s {base * 1e3:.2f} ms"
            f"{'' if r is None else f': {r:.2f}'}"
        )
        return [Reading("", r, text)]

    return Figure(read, lambda v: f"{v:.2f} x the floor's")


def _first_contact_of_plain(labels: Sequence[str], level: int) -> Figure:
    """bench.firstcontact's p99 at ``level`` sessions over plain Postfix's (case 1, same
    address kind, same run), per case and kind."""

    def read(report: Report) -> list[Reading]:
        data = report.extras.get("firstcontact")
        if data is None:
            return []
        entries = [e for e in data["cases"] if e["sessions"] == level]
        plain = {
            e["kind"]: float(e["p99_ms"])
            for e in entries
            if str(e["case"]).split(" ", 1)[0] == PLAIN.label
        }
        readings = []
        for e in entries:
            if str(e["case"]).split(" ", 1)[0] not in labels:
                continue
            p99, base = float(e["p99_ms"]), plain.get(e["kind"])
            r = None if not base else p99 / base
            text = f"{p99:g} ms against plain's {base:g} ms" if base else f"{p99:g} ms"
            if r is not None:
                text += f": {r:.2f}x"
            readings.append(Reading(f", {e['case']}, {e['kind']}", r, text))
        return readings

    return Figure(read, lambda v: f"{v:g}x")


COLD_RATE = {
    case: Target(
        name=f"cold msg/s, {which} ({case.label}), {{bound}} of plain Postfix{{where}}",
        figure=_ratio_to_plain("cold", case, PRIMARIES),
        comparison="≥",
        threshold=0.80,
    )
    for case, which in ((CALLAHEAD, "milter"), (POLICY, "policy service"))
}
COLD_CPU = {
    case: Target(
        name=f"callahead CPU per cold message, {which} ({case.label}), {{bound}}{{where}}",
        figure=_cold_cpu(case),
        comparison="≤",
        threshold=threshold,
    )
    for case, which, threshold in ((CALLAHEAD, "milter", 0.6), (POLICY, "policy service", 0.3))
}
WARM_CPU = {
    case: Target(
        name=f"callahead CPU per warm message, {which} ({case.label}), {{bound}}",
        figure=_warm_cpu_of_floor(case),
        comparison="≤",
        threshold=1.10,
    )
    for case, which in ((CALLAHEAD, "milter"), (POLICY, "policy service"))
}
FLOOD_RATE = Target(
    name="flood sessions/s {bound} of plain Postfix{where}",
    figure=_extra("flood", _flood("sessions_of_plain", ("2g", "2", "2p"))),
    comparison="≥",
    threshold=0.6,
)
FLOOD_MADE_UP = Target(
    name="flood: made-up recipients answered 250 while the primary is up {bound}{where}",
    figure=_extra("flood", _flood_made_up_250),
    comparison="≤",
    threshold=0.0,
)
FIRST_CONTACT = Target(
    name="first-contact p99 at 10 sessions (bench.firstcontact) {bound} plain Postfix's{where}",
    figure=_first_contact_of_plain(("2", "2p"), 10),
    comparison="≤",
    threshold=1.5,
)
LIVE_MEMORY = Target(
    name="RSS per address probed live through serve (bench.livememory --live) {bound}{where}",
    figure=_extra("livememory_live", _live_memory("bytes_per_address", say_count=True), " B"),
    comparison="≤",
    threshold=400.0,
)
LIVE_MARGINAL = Target(
    name="(for comparison) the same, the second half's growth per address (marginal)",
    figure=_extra("livememory_live", _live_memory("marginal"), " B"),
)


TARGETS = (
    Target(
        name="warm msg/s, policy service (2p), {bound} of plain Postfix{where}",
        figure=_ratio_to_plain("warm", POLICY, PRIMARIES),
        comparison="≥",
        threshold=0.90,
    ),
    Target(
        name="warm msg/s, policy service (2p), {bound} of the do-nothing policy service{where}",
        figure=_ratio_to_floor("warm", POLICY),
        comparison="≥",
        threshold=0.97,
    ),
    Target(
        name="warm msg/s, milter (2), {bound} of the do-nothing pymilter milter{where}",
        figure=_ratio_to_floor("warm", CALLAHEAD),
        comparison="≥",
        threshold=0.97,
    ),
    Target(
        name="(for comparison) warm msg/s, milter (2), of plain Postfix{where}",
        figure=_ratio_to_plain("warm", CALLAHEAD, PRIMARIES),
    ),
    Target(
        name="(for comparison) warm msg/s of the do-nothing {where}, of plain Postfix",
        figure=_floors_to_plain(),
    ),
    WARM_CPU[CALLAHEAD],
    WARM_CPU[POLICY],
    COLD_RATE[POLICY],
    COLD_RATE[CALLAHEAD],
    COLD_CPU[CALLAHEAD],
    COLD_CPU[POLICY],
    Target(
        name="(for comparison) policy service first-contact p99, {where}",
        figure=_first_contact_p99(POLICY, sessions_at_least=2),
    ),
    Target(
        name="(for comparison) milter first-contact p99, {where}",
        figure=_first_contact_p99(CALLAHEAD, sessions_at_least=2),
    ),
    Target(
        name="(for comparison) plain Postfix RCPT reply, {where}",
        figure=_first_contact_spread(PLAIN, ["valid"], "{sessions}"),
    ),
    Target(
        name="(for comparison) reject_unverified_recipient first contact, {where}",
        figure=_first_contact_spread(VERIFY, ["valid", "unknown"], "{kind}, primary {primary}"),
    ),
    Target(
        name="{bound} new connection to the primary per 100 probes (cold, {where})",
        figure=Figure(_cold_connections_per_100, lambda v: f"{v:g}"),
        comparison="≤",
        threshold=1.0,
    ),
    Target(
        name="{bound} bytes RSS per cached address at 1,000,000",
        figure=Figure(_bytes_per_cached_address, lambda v: f"{v:g}"),
        comparison="≤",
        threshold=400,
    ),
    Target(
        name="warm policy service CPU per request (bench.policycpu), {bound}",
        figure=_extra("policycpu", _policy_cpu("callahead", "cpu_us_per_request"), " µs"),
        comparison="≤",
        threshold=40.0,
    ),
    Target(
        name="(for comparison) do-nothing policy service CPU per request (bench.policycpu)",
        figure=_extra("policycpu", _policy_cpu("trivial", "cpu_us_per_request"), " µs"),
    ),
    Target(
        name="(for comparison) warm policy service CPU per request, of the do-nothing one's",
        figure=_extra("policycpu", _policy_cpu("callahead", "cpu_of_trivial")),
    ),
    FLOOD_RATE,
    FLOOD_MADE_UP,
    Target(
        name="flood: new primary connections per 50 probes {bound}{where}",
        figure=_extra("flood", _flood("primary_connections_per_50_probes", ("2g", "2", "2p"))),
        comparison="≤",
        threshold=1.0,
    ),
    FIRST_CONTACT,
    Target(
        name="(for comparison) first-contact p99 at 10 sessions (bench.firstcontact), {where}",
        figure=_extra("firstcontact", _first_contact(("2", "2p", "1", "2n"), 10), " ms"),
    ),
    Target(
        name="RSS per cached address of a running serve at 1,000,000 (bench.livememory) {bound}",
        figure=_extra("livememory", _live_memory("bytes_per_address"), " B"),
        comparison="≤",
        threshold=400.0,
    ),
    LIVE_MEMORY,
    LIVE_MARGINAL,
)
"""The benchmark's targets, in the order of the report, with the figures shown beside
them for comparison."""


@dataclass(frozen=True)
class IssueRow:
    """A row of issue 30's table: what it measures (``{where}`` gets the reading), the
    issue's figure when it was filed, and the target (also in ``TARGETS``)."""

    figure: str
    before: str
    target: Target


ISSUE_30 = (
    IssueRow("cold msg/s / plain Postfix, milter (2){where}", "0.64", COLD_RATE[CALLAHEAD]),
    IssueRow("cold msg/s / plain Postfix, policy service (2p){where}", "0.73", COLD_RATE[POLICY]),
    IssueRow(
        "callahead CPU per cold message (probe included), milter (2){where}",
        "1.26 ms",
        COLD_CPU[CALLAHEAD],
    ),
    IssueRow(
        "callahead CPU per cold message (probe included), policy service (2p){where}",
        "0.62 ms",
        COLD_CPU[POLICY],
    ),
    IssueRow(
        "callahead CPU per warm message, milter (2), of the do-nothing milter's (2t)",
        "0.74 ms",
        WARM_CPU[CALLAHEAD],
    ),
    IssueRow(
        "callahead CPU per warm message, policy service (2p), of the do-nothing one's (2pt)",
        "0.34 ms",
        WARM_CPU[POLICY],
    ),
    IssueRow("the flood (bench.flood) sessions/s / plain Postfix{where}", "0.38-0.48", FLOOD_RATE),
    IssueRow("the flood: made-up recipients answered 250{where}", "-", FLOOD_MADE_UP),
    IssueRow(
        "first contact p99 at 10 sessions / plain Postfix's p99 (bench.firstcontact){where}",
        "about 2-3x",
        FIRST_CONTACT,
    ),
    IssueRow(
        "memory per address probed live through serve (bench.livememory --live){where}",
        "472 B",
        LIVE_MEMORY,
    ),
    IssueRow(
        "(for comparison) the same, the second half's growth per address (marginal)",
        "-",
        LIVE_MARGINAL,
    ),
)


def render_issue_30(report: Report) -> list[str]:
    rows: list[list[str]] = []
    for row in ISSUE_30:
        target = row.target.bound or "(for comparison)"
        readings = row.target.figure.read(report)
        if not readings:
            rows.append([row.figure.format(where=""), row.before, "not measured", target, "-"])
        for r in readings:
            rows.append(
                [
                    row.figure.format(where=r.where),
                    row.before,
                    r.text,
                    target,
                    row.target.met(r.value),
                ]
            )
    return section(
        "The cold path (issue 30)",
        "Issue 30's table measured in this benchmark: each ratio against plain Postfix "
        "(case 1) or the front end's do-nothing floor (2t, 2pt) measured in the same "
        "interleaved runs (the main rotating runs; bench.flood and bench.firstcontact run "
        "case 1 among the others in their own rotating runs). Milter is case 2, policy "
        "service case 2p: one callahead process, whose CPU (utime + stime) is counted over "
        "each case's own runs (see the CPU table below). Before issue 30: the figures of "
        "the issue as filed (another run; the cold CPU figures from bench.coldpath).",
        ["figure", "before issue 30", "measured", "target", "met"],
        rows,
    )


def render_targets(report: Report) -> list[str]:
    rows = [row for target in TARGETS for row in target.rows(report)]
    return [
        "## Targets (measured, not asserted)",
        "",
        *table(["target", "measured", "met"], rows),
    ]


def render_extras(report: Report) -> list[str]:
    """The separate drivers' figures (bench/README.md says how each measures)."""
    out: list[str] = []
    cpu = report.extras.get("policycpu")
    if cpu:
        out += [
            "## CPU per warm policy request, straight to the service",
            "",
            "`python -m bench.policycpu`: Postfix 3.7's request, every recipient cached, 10 kept "
            "connections, servers in a rotating order; each server's own CPU per request.",
            "",
            *table(
                [
                    "server",
                    "CPU per request, median [range]",
                    "of the do-nothing one's",
                    "requests/s",
                ],
                [
                    [
                        str(x["server"]),
                        f"{x['cpu_us_per_request']} µs [{x['cpu_us_range'][0]}-"
                        f"{x['cpu_us_range'][1]}]",
                        str(x["cpu_of_trivial"]),
                        str(x["requests_per_s"]),
                    ]
                    for x in cpu
                ],
            ),
            "",
        ]
    flood = report.extras.get("flood")
    if flood:
        settings = flood["settings"]
        out += [
            "## Flood: a dictionary attack",
            "",
            f"`python -m bench.flood`: {settings['concurrency']} concurrent sessions from "
            f"{settings['clients']} client addresses, {settings['rcpts']} recipients each, "
            f"{settings['real']:.0%} real users, the rest made-up; {settings['sessions']} "
            f"sessions per run and case, {settings['runs']} runs; the primary b.test (Postfix "
            "defaults). Sessions per second is the rate to compare (a session with no real "
            "recipient sends no message).",
            "",
            *table(
                [
                    "case",
                    "sessions/s (of plain)",
                    "RCPT p50 / p99",
                    "made-up answered",
                    "real answered",
                    "probes per recipient",
                    "new connections per 50 probes",
                    "callahead CPU per recipient",
                    "cores used",
                ],
                [
                    [
                        str(e["case"]),
                        f"{e['sessions_per_s']} ({e['sessions_of_plain']})",
                        f"{e['rcpt_p50_ms']} / {e['rcpt_p99_ms']} ms",
                        ", ".join(f"{k}: {v}" for k, v in e["unknown_replies"].items()),
                        ", ".join(f"{k}: {v}" for k, v in e["real_replies"].items()),
                        str(e["probes_per_recipient"]),
                        str(e["primary_connections_per_50_probes"] or "-"),
                        "-"
                        if e["callahead_cpu_us_per_recipient"] is None
                        else f"{e['callahead_cpu_us_per_recipient']} µs",
                        ", ".join(f"{k} {v}" for k, v in e["cpu_cores_used"].items()),
                    ]
                    for e in flood["cases"]
                ],
            ),
            "",
        ]
    first = report.extras.get("firstcontact")
    if first:
        settings = first["settings"]
        out += [
            "## First contact at 1, 10 and 50 sessions",
            "",
            f"`python -m bench.firstcontact`: sessions of one RCPT each, every recipient new "
            f"({settings['samples']} real users and {settings['samples']} made-up per round, "
            f"level and case), {settings['rounds']} rounds, cases in a rotating order; the "
            f"primary {first['primary']}. 2n is a second callahead with "
            "`CALLAHEAD_PROBE_PIPELINING=no`.",
            "",
            *table(
                [
                    "case",
                    "sessions",
                    "kind",
                    "RCPT p50 / p99",
                    "p99 per round",
                    "replies",
                    "new connections per 100 probes",
                ],
                [
                    [
                        str(e["case"]),
                        str(e["sessions"]),
                        str(e["kind"]),
                        f"{e['p50_ms']} / {e['p99_ms']} ms",
                        ", ".join(f"{x:g}" for x in e["p99_ms_rounds"]),
                        ", ".join(f"{k}: {v}" for k, v in sorted(e["replies"].items())),
                        "-"
                        if e["primary_connections_per_100_probes"] is None
                        else str(e["primary_connections_per_100_probes"]),
                    ]
                    for e in first["cases"]
                ],
            ),
            "",
            "CPU per session (ms), by process group:",
            "",
            *table(
                ["case and sessions", "callahead", "backup Postfix", "primary Postfix", "load"],
                [
                    [
                        where,
                        str(split.get("callahead", "-")),
                        str(split.get("backup Postfix", "-")),
                        str(split.get("primary Postfix", "-")),
                        str(split.get("load generator", "-")),
                    ]
                    for where, split in first["cpu_ms_per_session"].items()
                ],
            ),
            "",
        ]
    live = report.extras.get("livememory")
    if live:
        out += [
            "## A running serve holding cached addresses",
            "",
            f"`python -m bench.livememory`: {live['addresses']} addresses loaded from a cache "
            f"file: RSS {fmt_bytes(live['rss_full'])} against {fmt_bytes(live['rss_empty'])} "
            f"with none, **{live['bytes_per_address']} B per address** (loaded in "
            f"{live['load_seconds']} s).",
            "",
        ]
    probed = report.extras.get("livememory_live")
    if probed:
        marginal = probed.get("marginal")
        out += [
            "## A running serve holding addresses probed live",
            "",
            f"`python -m bench.livememory {probed['addresses']} --live`: {probed['addresses']} "
            "addresses, each a real user of a Postfix primary asked once through the policy "
            f"service (10 connections): RSS {fmt_bytes(probed['rss_full'])} against "
            f"{fmt_bytes(probed['rss_empty'])} for a serve with none, "
            f"**{probed['bytes_per_address']} B per address** (probed in "
            f"{probed['load_seconds']} s)"
            + (
                ""
                if marginal is None
                else f"; from half of them in ({fmt_bytes(probed['rss_half'])}) to all, "
                f"{marginal} B per address (what one more costs, once probing's own "
                "buffers are paid)"
            )
            + ".",
            "",
        ]
    return out


def render(report: Report, env: list[str]) -> str:
    s = report.settings
    wall = report.elapsed()
    out = ["# callahead benchmark", ""]
    out += [f"- {line}" for line in env]
    out += [
        f"- command: `./dev bench` (`python -m bench.run`), runs {s.runs}, messages per run "
        f"{s.messages} (case 3 cold {s.slow_messages}, case 3 attack "
        f"{s.slow_attack_messages}), sessions {s.sessions}; wall time {wall / 60:.1f} min "
        f"({report.setup_seconds:.1f} s of it starting the stack); separate drivers: "
        + (", ".join(s.extras) or "none")
        + (
            " with small counts (`--quick-extras`: a smoke test, not figures)"
            if s.quick_extras
            else ""
        ),
        "- case 2's callahead: defaults, except `CALLAHEAD_CLIENT_UNKNOWN_LIMIT=0` (see 2g)"
        + "".join(f", `{k}={v}`" for k, v in s.callahead_env.items()),
        f"- load average (1/5/15 min) at the start {report.load_start}, at the end "
        f"{report.load_end or loadavg()}: anything else running on the machine shows in "
        "every figure, so compare the cases of one run, not runs of different days",
        "",
        "Cases, all listeners of one Postfix backup MX (master.cf `-o` overrides) sharing one "
        "machine state: **1** plain Postfix, no recipient check; **2** callahead attached "
        "(`smtpd_milters`); **3** `reject_unverified_recipient` with "
        "`address_verify_negative_cache = no` and `unverified_recipient_reject_code = 550`. "
        "Probes (callahead's and Postfix's) go to a real Postfix primary that knows its users; "
        "deliveries go to smtp-sink. Workloads: **warm** every recipient valid and already "
        "cached (by callahead, and in Postfix's verify cache); **cold** every recipient valid "
        "and new; **attack** every recipient unknown. Two more listeners of the same backup "
        "give context: **2g** a second callahead with its per-client guard at the defaults "
        "(attack only; case 2 runs with `CALLAHEAD_CLIENT_UNKNOWN_LIMIT=0` because all load "
        "comes from 127.0.0.1), **2t** a pymilter milter that only says CONTINUE, negotiated "
        "like callahead (warm only): the floor of any pymilter milter. **2p** is callahead's "
        "policy service (`check_policy_service` with the settings of "
        "`deploy/postfix-policy-main.cf`; the same callahead process as case 2) and **2pt** "
        "an asyncio policy service that only says DUNNO, attached the same way (warm only): "
        "the floor of any policy service.",
        "",
    ]
    out += [*render_issue_30(report), ""]
    out += [*render_targets(report), ""]
    out += [*render_throughput(report), ""]
    out += [*render_latency(report), ""]
    out += [*render_connections(report), ""]
    out += [*render_cpu(report), ""]
    out += [*render_memory(report), ""]
    out += render_extras(report)
    out += [
        "## Method notes",
        "",
        "- the shared cache (Redis) is measured apart, by `python -m bench.redis`: "
        "`bench/RESULTS-redis.md`.",
        "- cold: `smtp-source -c -N -s SESSIONS -m COUNT -l 512`; `-N` numbers the "
        "recipients, so message n goes to `<n>c<case>r<run>@domain`: new addresses every run, "
        "all known to the primary.",
        f"- warm: {s.sessions} `smtp-source -c -N -s 1 -m {warm_count(s)} -l 512` processes at "
        f"once, each sending one message to each of the same {warm_count(s)} addresses "
        "`<n>w@a.test`. Before the warm runs, Postfix's verify cache is filled through a "
        "fourth listener with `address_verify_poll_count = 1` (it answers 450 at once and "
        "verifies in the background), and one unmeasured pass over the addresses fills "
        "callahead's cache.",
        "- attack and first contact: the bench's own asyncio client (`bench/smtpclient.py`), "
        "because smtp-source aborts on a rejected RCPT. Attack sessions carry one unknown "
        "recipient each and send the message when it is accepted (case 1 relays it); the "
        "rate counts completed sessions.",
        "- warm makes no probes, so it runs against one primary only.",
        f"- reject_unverified_recipient: a first contact waits for Postfix's verify polling "
        f"(`address_verify_poll_delay` 3 s), so its cold and attack runs use fewer messages and "
        f"its first-contact figures {s.verify_latency_samples} samples per kind with "
        f"{s.verify_latency_sessions} concurrent sessions (Postfix allows 50 per client).",
        "- every figure comes from this one run of the benchmark; nothing is copied from "
        "elsewhere.",
    ]
    for text in report.notes:
        out.append(f"- observed: {text}")
    for what in report.skipped:
        out.append(f"- skipped because of the time budget: {what}")
    return "\n".join(out) + "\n"
