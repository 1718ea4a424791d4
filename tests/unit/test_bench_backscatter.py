"""The pure helpers of bench/backscatter.py: each recipient's last status read from a
backup's mail log, by kind, and the non-delivery notifications counted once each."""

from __future__ import annotations

from bench.backscatter import DOMAIN, code_class, fates

LOG = f"""\
Dec  7 13:12:30 backup postfix-b/smtp[1]: 4AbC: to=<user1@{DOMAIN}>, relay=none, \
delay=1, delays=0/0/1/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1: refused)
Dec  7 13:12:31 backup postfix-b/smtp[1]: 4AbC: to=<x1@{DOMAIN}>, relay=none, \
delay=1, delays=0/0/1/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1: refused)
Dec  7 13:13:11 backup postfix-b/smtp[2]: 4AbC: to=<user1@{DOMAIN}>, \
relay=127.0.0.1[127.0.0.1]:2525, delay=41, dsn=2.0.0, status=sent (250 2.0.0 Ok)
Dec  7 13:13:11 backup postfix-b/smtp[2]: 4AbC: to=<x1@{DOMAIN}>, \
relay=127.0.0.1[127.0.0.1]:2525, delay=41, dsn=5.1.1, status=bounced (host said: 550 5.1.1)
Dec  7 13:13:11 backup postfix-b/bounce[3]: 4AbC: sender non-delivery notification: 4XyZ
Dec  7 13:13:11 backup postfix-b/error[4]: 4XyZ: to=<victim@forged.test>, relay=none, \
delay=0, dsn=5.3.0, status=bounced (no delivery outside the test domains)
"""


def test_each_recipient_counts_once_by_its_last_status() -> None:
    found = fates(LOG, {f"user1@{DOMAIN}"})
    assert found == {"real sent": 1, "made-up bounced": 1, "notifications": 1}


def test_a_log_without_deliveries_counts_nothing() -> None:
    assert fates("Dec  7 postfix/qmgr[1]: 4Xy: removed\n", set()) == {"notifications": 0}


def test_reply_codes_are_classed() -> None:
    assert [code_class(c) for c in (250, 550, 451, 554)] == ["250", "550", "4xx", "5xx"]
