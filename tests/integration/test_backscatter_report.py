"""``callahead report`` end to end, on the backscatter meter's rig (its own callahead,
real Postfix backup and primary: test_backscatter_meter.py): with the primary down a
known and an unknown user are accepted (``primary_down``) and queued; the primary comes
back and the queue is flushed. The report then shows, for the domain, 1 sent and 1
bounced (a backscatter) under ``primary_down``: from the running serve over its admin
socket, and the same from the logs alone (callahead's log file and the backup's mail
log), as after serve stopped."""

from __future__ import annotations

import json
from typing import Any

from tests.harness.client import make_message, send
from tests.harness.waiting import wait_for

from . import test_backscatter_meter as meter
from .conftest import SENDER, MetricsDelta

rig = meter.rig
DOMAIN = meter.DOMAIN


def report(r: meter.Rig, *args: str) -> tuple[dict[str, Any], str]:
    """``callahead report ARGS`` as JSON, and as the table it prints."""
    shown = r.callahead.cli("report", *args)
    assert shown.returncode == 0, shown.stderr
    answer = r.callahead.cli("report", "--json", *args)
    assert answer.returncode == 0, answer.stderr
    parsed: dict[str, Any] = json.loads(answer.stdout)
    return parsed, shown.stdout


def test_report_from_serve_and_from_the_logs_alone(rig: meter.Rig) -> None:
    delta = MetricsDelta(rig.callahead)
    port = rig.ports["milter"]
    known, unknown = f"known-milter@{DOMAIN}", f"gone-milter@{DOMAIN}"
    if rig.primary.running:
        rig.primary.stop()
    send(port, SENDER, [f"warm-up@{DOMAIN}"])  # the breaker opens: the primary is down
    _, body = make_message(SENDER, [known, unknown])
    tx = send(port, SENDER, [known, unknown], body)
    assert tx.code(known) == 250 and tx.code(unknown) == 250
    rig.primary.start()
    rig.backup.flush()
    wait_for(
        lambda: delta("callahead_backscatter_total", reason="primary_down") == 1,
        meter.TIMEOUT,
        what="the bounce and its notification read",
    )

    from_serve, table = report(rig, "--domain", DOMAIN)
    print(table)
    assert from_serve["source"] == "daemon" and from_serve["metered"] is True
    rows = from_serve["domains"][DOMAIN]["accepted"]
    assert rows["primary_down"] == {
        "accepted": 2,
        "sent": 1,
        "bounced": 1,
        "backscatter": 1,
        "deferred": 0,
        "expired": 0,
        "unknown": 0,
    }
    # warm-up@, accepted when the first probe found the primary refusing connections, at
    # RCPT only: no message, no fate.
    assert rows["probe_tempfail"]["accepted"] == rows["probe_tempfail"]["unknown"] == 1
    line = next(r.split() for r in table.splitlines() if r.strip().startswith("primary_down"))
    assert line == ["primary_down", "2", "1", "1", "1", "0", "0", "0"]

    # callahead's own log (the decision lines) and every file of the backup's mail log.
    files = [rig.callahead.log_path, *rig.logs()]
    logs = [a for path in files for a in ("--log", str(path))]
    wait_for(
        lambda: (
            report(rig, "--from", "log", "--domain", DOMAIN, *logs)[0]["domains"]
            == from_serve["domains"]
        ),
        meter.TIMEOUT,
        what="the logs alone say what serve says",
    )
    from_logs, table = report(rig, "--from", "log", "--domain", DOMAIN, *logs)
    print(table)
    assert from_logs["source"] == "log"
    # --since reads the logs (without --from), from that time on.
    recent, _ = report(rig, "--since", "1h", "--domain", DOMAIN, *logs)
    assert recent["source"] == "log" and recent["domains"] == from_serve["domains"]
    for (name, labels), value in sorted(rig.callahead.samples().items()):
        if name in ("callahead_relay_outcomes_total", "callahead_backscatter_total"):
            print(name, dict(labels), value)  # the metrics after it, for the record
