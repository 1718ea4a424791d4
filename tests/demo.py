"""``./dev demo``: a whole local stack on loopback, and a scripted SMTP session.

It starts a stand-in primary that knows alice and bob, callahead attached to a real
Postfix backup MX (configured from deploy/postfix-main.cf), and shows, as a sender sees
it: a known user accepted and delivered, an unknown user rejected with 550, and with
the primary stopped, a message accepted, queued, and delivered once the primary is back.
Everything it starts is stopped at the end.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.client import Transaction, make_message, send
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import Listener, PostfixInstance, backup_mx_main_cf
from tests.harness.primary import Primary
from tests.harness.waiting import wait_for

REPO = Path(__file__).resolve().parents[1]
SENDER = "someone@sender.test"
DOMAIN = "example.test"


def say(text: str = "") -> None:
    print(text, flush=True)


def show(tx: Transaction) -> None:
    say(f"  C: MAIL FROM:<{SENDER}>")
    say(f"  S: {tx.mail[0]} {tx.mail[1]}")
    for rcpt, (code, text) in tx.rcpt.items():
        say(f"  C: RCPT TO:<{rcpt}>")
        say(f"  S: {code} {text}    ({tx.rcpt_seconds[rcpt] * 1000:.1f} ms)")
    if tx.data is not None:
        say("  C: DATA ...")
        say(f"  S: {tx.data[0]} {tx.data[1]}")


def check(ok: bool, text: str) -> None:
    say(f"  {'ok' if ok else 'FAILED'}: {text}")
    if not ok:
        raise SystemExit(1)


def demo(primary: Primary, backup: PostfixInstance, port: int, callahead: CallaheadProcess) -> None:
    alice, bob, nobody = f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"nobody@{DOMAIN}"

    def delivered(addr: str, token: str) -> Callable[[], bool]:
        return lambda: any(token.encode() in m for m in primary.mailbox(addr))

    say("1. A known user: callahead asks the primary, which says yes.")
    token, body = make_message(SENDER, [alice], "hello alice")
    tx = send(port, SENDER, [alice], body)
    show(tx)
    check(tx.code(alice) == 250, "accepted at RCPT TO")
    check(primary.probes_for(alice) == 1, "the primary saw one probe (MAIL FROM:<>, RCPT TO)")
    wait_for(delivered(alice, token), 30, what="delivery to alice")
    check(True, "relayed by Postfix and delivered to alice's mailbox at the primary")
    say()

    say("2. An unknown user: the primary says no, so the backup refuses at RCPT TO.")
    tx = send(port, SENDER, [nobody])
    show(tx)
    check(tx.code(nobody) == 550, "rejected with 550 5.1.1: no backscatter later")
    say()

    say("3. The primary goes down: mail is accepted and queued, never refused.")
    primary.stop()
    token, body = make_message(SENDER, [bob], "hello bob")
    tx = send(port, SENDER, [bob], body)
    show(tx)
    check(tx.code(bob) == 250, "accepted although the probe could not be made")
    queued = re.search(r"queued as (\w+)", tx.data[1] if tx.data else "")
    queue_id = queued.group(1) if queued else "?"
    wait_for(
        lambda: any(
            e["queue_id"] == queue_id and e["queue_name"] == "deferred"
            for e in backup.queue_entries()
        ),
        30,
        what="the message to be deferred",
    )
    check(True, f"message {queue_id} waits in the backup's deferred queue")
    say("   ... the primary comes back; the backup's queue is flushed.")
    primary.start()
    backup.flush()
    wait_for(delivered(bob, token), 30, what="delivery to bob")
    wait_for(lambda: queue_id not in backup.queue_ids(), 10, what="the queue to empty")
    check(True, "delivered to bob's mailbox; the backup's queue is empty")
    say()

    say("4. alice again: answered from the positive cache, no new probe.")
    tx = send(port, SENDER, [alice])
    show(tx)
    check(tx.code(alice) == 250 and primary.probes_for(alice) == 1, "no new probe")
    say()

    say("callahead's decision log:")
    for line in callahead.log().splitlines():
        if "decision=" in line:
            say("  " + line.split(": INFO ", 1)[-1])
    say()
    say("callahead's metrics (excerpt of /metrics; callahead_probes_total also counts its")
    say("catch-all check, one probe of a made-up address at the domain's first recipient):")
    for line in callahead.scrape().splitlines():
        counters = (
            "callahead_rcpt_decisions_total",
            "callahead_probes_total",
            "callahead_catchall_checks_total",
            "callahead_domain_accepts_all",
        )
        if line.startswith(counters) and not line.endswith(" 0.0"):
            say("  " + line)


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (Postfix's master needs it)", file=sys.stderr)
        return 1
    started = time.monotonic()
    with make_workdir("callahead-demo-") as workdir:
        primary = Primary([f"alice@{DOMAIN}", f"bob@{DOMAIN}"], hostname="primary.test")
        with primary:
            callahead = CallaheadProcess(
                workdir,
                {
                    "CALLAHEAD_ROUTES": f"{DOMAIN}=[127.0.0.1]:{primary.port}",
                    "CALLAHEAD_PROBE_TIMEOUT": "3",
                    "CALLAHEAD_LOG_LEVEL": "INFO",
                },
            )
            with callahead:
                port = free_port()
                main_cf = backup_mx_main_cf(
                    REPO / "deploy" / "postfix-main.cf",
                    workdir=workdir / "backup",
                    relay_domains=[DOMAIN],
                    transports={DOMAIN: f"[127.0.0.1]:{primary.port}"},
                    milter=callahead.socket,
                )
                with PostfixInstance(workdir / "backup", main_cf, [Listener(port)]) as backup:
                    say(f"primary (stand-in, users alice and bob): 127.0.0.1:{primary.port}")
                    say(f"callahead: {callahead.socket}, metrics on port {callahead.metrics_port}")
                    say(f"Postfix backup MX for {DOMAIN}: 127.0.0.1:{port}")
                    say()
                    try:
                        demo(primary, backup, port, callahead)
                    except TimeoutError:
                        say("--- backup maillog (tail) ---")
                        say("\n".join(backup.maillog().splitlines()[-30:]))
                        say("--- callahead log (tail) ---")
                        say("\n".join(callahead.log().splitlines()[-30:]))
                        raise
    say()
    say(f"demo finished in {time.monotonic() - started:.1f} s; everything it started is stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
