"""The pure helpers of bench/shape.py: reading a primary's command counts from its
``disconnect from`` lines, and the report built from made-up phases."""

from __future__ import annotations

from bench.shape import Commands, Phase, connects, parse_commands, render

LOG = """\
Dec  3 17:37:20 primary postfix-primary/smtpd[17796]: connect from unknown[127.0.0.1]
Dec  3 17:37:21 primary postfix-primary/smtpd[17796]: disconnect from unknown[127.0.0.1] \
ehlo=1 mail=51 rcpt=51/52 rset=50 quit=1 commands=154/155
Dec  3 17:37:21 primary postfix-primary/smtpd[17771]: connect from unknown[127.0.0.1]
Dec  3 17:37:21 primary postfix-primary/smtpd[17771]: 4Xy7Qn0k9Vz3m: client=unknown[127.0.0.1]
Dec  3 17:37:21 primary postfix-primary/smtpd[17771]: disconnect from unknown[127.0.0.1] \
ehlo=1 mail=1 rcpt=1/10 commands=3/12
Dec  3 17:37:21 primary postfix-primary/cleanup[17800]: 4Xy: message-id=<x@y>
"""


def test_command_counts_are_summed_over_sessions() -> None:
    found = parse_commands(LOG)
    assert found == Commands(sessions=2, mail=52, rcpt=62, rcpt_accepted=52, rset=50, queue_files=1)
    assert connects(LOG) == 2


def test_a_log_without_sessions_counts_nothing() -> None:
    assert parse_commands("Dec  3 postfix/qmgr[1]: 4Xy: removed\n") == Commands()


def test_the_report_has_a_row_per_case_and_per_phase() -> None:
    phases = [
        Phase("A", 1, "valid", 1, times=[0.001, 0.002], wall=0.01, tokens_before=100),
        Phase("B", 1, "valid", 10, times=[1.0, 1.2, 0.002], wall=1.3),
    ]
    phases[0].tokens_after = 99
    text = render(phases, ["date: test"], count=2, runs=1)
    assert "| A | valid | 1 | 1 | 1.5 ms |" in text
    assert "| B | valid | 10 | 1 |" in text
    assert "2/3 |" in text  # two of B's three probes took >= 0.9 s
    assert "100 -> 99" in text
