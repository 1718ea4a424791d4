"""Recipients with bytes that are not UTF-8, through a real Postfix backup MX.

A client may put any 8-bit byte in ``RCPT TO``. What reaches callahead is what a real
Postfix lets through, so this module asks one: a backup MX whose routes callahead reads
from the backup's own configuration (``CALLAHEAD_POSTFIX_CONFIG``, with a regexp table
in ``transport_maps``, searched with the whole address as Postfix does), with four
listeners: the milter and the policy service, each with Postfix's default
``smtputf8_enable = yes`` and with ``smtputf8_enable = no``; and a client that sends the
raw bytes, with and without ``MAIL FROM ... SMTPUTF8``.

An address whose bytes are not UTF-8 cannot be looked up in a Postfix map, cached or
probed: callahead judges it ``bad_address`` before routing (the tempfail action, here
accept: never a reject), and never fails with an internal error.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.fixtures import make_workdir
from tests.harness.ports import free_port
from tests.harness.postfix import (
    POLICY_SNIPPET,
    SNIPPET,
    Listener,
    PostfixInstance,
    backup_mx_main_cf,
    instance_paths,
    policy_overrides,
)
from tests.harness.primary import Primary
from tests.harness.waiting import wait_for

KNOWN = "known@example.test"
EIGHT_BIT = b"us\xffer@example.test"
"""A local part with a byte that is no UTF-8 (0xff never is)."""
EIGHT_BIT_TEXT = EIGHT_BIT.decode("utf-8", "surrogateescape")
"""How a Python front end sees it (surrogateescape): what the policy core is handed."""
LOGGED = "us\\udcffer@example.test"
"""How callahead's log line shows it (logfmt.escape)."""
SENDER = b"sender@remote.test"


@dataclass
class Rig:
    backup: PostfixInstance
    process: CallaheadProcess
    primary: Primary
    ports: dict[tuple[str, bool], int]
    """The backup listener of each (front end, smtputf8_enable)."""


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    if os.geteuid() != 0:
        pytest.skip("the integration tests run a real Postfix, whose master needs root")
    with make_workdir() as workdir, contextlib.ExitStack() as started:
        primary = started.enter_context(Primary([KNOWN]))
        backup_dir = workdir / "backup"
        regexp = workdir / "transport.regexp"
        regexp.write_text("/^nobody@example\\.test$/ error:5.1.1 no such user\n")
        main_cf = backup_mx_main_cf(
            SNIPPET,
            workdir=backup_dir,
            relay_domains=["example.test"],
            transports={"example.test": f"[127.0.0.1]:{primary.port}"},
            milter=None,
        )
        main_cf["transport_maps"] += f", regexp:{regexp}"
        process = CallaheadProcess(
            workdir,
            {
                "CALLAHEAD_POSTFIX_CONFIG": str(instance_paths(backup_dir).config_dir),
                "CALLAHEAD_PROBE_TIMEOUT": "5",
                "CALLAHEAD_CATCHALL_CHECK": "0",
            },
            name="callahead-eightbit",
        )
        ports = {
            (front, utf8): free_port() for front in ("milter", "policy") for utf8 in (True, False)
        }
        listeners = []
        for (front, utf8), port in ports.items():
            overrides = (
                {"smtpd_milters": process.socket}
                if front == "milter"
                else policy_overrides(POLICY_SNIPPET, process.policy_service)
            )
            if not utf8:
                overrides["smtputf8_enable"] = "no"
            listeners.append(Listener(port, overrides))
        backup = started.enter_context(PostfixInstance(backup_dir, main_cf, listeners))
        started.enter_context(process)
        yield Rig(backup, process, primary, ports)


def rcpt_replies(port: int, rcpts: list[bytes], *, smtputf8: bool) -> list[bytes]:
    """EHLO, MAIL FROM (with SMTPUTF8 if asked), then the raw RCPT TO lines (if MAIL FROM
    was taken); the replies to MAIL FROM and each RCPT TO."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        reader = conn.makefile("rb")

        def reply() -> bytes:
            lines = []
            while True:
                line = reader.readline()
                assert line, "connection closed"
                lines.append(line.rstrip(b"\r\n"))
                if line[3:4] != b"-":
                    return b"\n".join(lines)

        def command(line: bytes) -> bytes:
            conn.sendall(line + b"\r\n")
            return reply()

        assert reply().startswith(b"220")
        assert command(b"EHLO client.test").startswith(b"250")
        mail = b"MAIL FROM:<" + SENDER + b">" + (b" SMTPUTF8" if smtputf8 else b"")
        out = [command(mail)]
        if out[0].startswith(b"250"):
            out += [command(b"RCPT TO:<" + rcpt + b">") for rcpt in rcpts]
        command(b"QUIT")
        return out


def policy_answer(port: int, recipient: bytes) -> bytes:
    """One raw policy request (as Postfix writes them) for ``recipient``; the answer."""
    request = b"".join(
        name + b"=" + value + b"\n"
        for name, value in [
            (b"request", b"smtpd_access_policy"),
            (b"protocol_state", b"RCPT"),
            (b"protocol_name", b"ESMTP"),
            (b"client_address", b"192.0.2.77"),
            (b"sender", SENDER),
            (b"recipient", recipient),
            (b"queue_id", b""),
        ]
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request + b"\n")
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = conn.recv(4096)
            assert chunk, f"connection closed after {answer!r}"
            answer += chunk
    return answer


def decision_lines(rig: Rig) -> list[str]:
    return [line for line in rig.process.log().splitlines() if "callahead.decision" in line]


# What Postfix 3.7 answers (measured here) to an RCPT TO with a byte that is no UTF-8,
# by smtputf8_enable and whether MAIL FROM said SMTPUTF8: it never gets to the milter or
# the policy service.
POSTFIX_REFUSES = {
    (True, True): b"500 5.5.2 Error: bad UTF-8 syntax",
    (True, False): b"500 5.5.2 Error: bad UTF-8 syntax",
    (False, False): b"501 5.1.3 Bad recipient address syntax",
}


@pytest.mark.parametrize("front", ["milter", "policy"])
@pytest.mark.parametrize("utf8_enabled", [True, False], ids=["smtputf8_enable", "no_smtputf8"])
@pytest.mark.parametrize("smtputf8", [True, False], ids=["SMTPUTF8", "plain"])
def test_postfix_refuses_such_bytes_before_callahead_sees_them(
    rig: Rig, front: str, utf8_enabled: bool, smtputf8: bool
) -> None:
    port = rig.ports[(front, utf8_enabled)]
    before = len(decision_lines(rig))
    eight_bit_domain = b"user@ex\xffample.test"
    replies = rcpt_replies(port, [EIGHT_BIT, eight_bit_domain, KNOWN.encode()], smtputf8=smtputf8)
    if not utf8_enabled and smtputf8:
        assert replies == [b"555 5.5.4 Unsupported option: SMTPUTF8"]
        return
    refused = POSTFIX_REFUSES[(utf8_enabled, smtputf8)]
    assert replies == [b"250 2.1.0 Ok", refused, refused, b"250 2.1.5 Ok"]
    # Only the known user reached callahead (then a cache hit), through this front end.
    lines = wait_for(
        lambda: decision_lines(rig)[before:] or None, 10.0, what="callahead's decision"
    )
    assert lines is not None and len(lines) == 1
    assert f"rcpt=<{KNOWN}> decision=accept" in lines[0]


@pytest.mark.parametrize(
    ("recipient", "logged"),
    [
        (EIGHT_BIT, LOGGED),
        (b"user@ex\xffample.test", "user@ex\\udcffample.test"),
    ],
)
def test_the_policy_service_judges_such_bytes_a_bad_address(
    rig: Rig, recipient: bytes, logged: str
) -> None:
    """Another MTA, a Postfix of another version, or a hand-made request may hand the
    bytes over: a bad_address with the tempfail action (accept here: no opinion), before
    the route lookup in the Postfix maps, which take UTF-8 only; never an error."""
    answer = policy_answer(rig.process.policy_port, recipient)
    assert answer == b"action=DUNNO\n\n"
    line = wait_for(
        lambda: next((x for x in decision_lines(rig) if f"rcpt=<{logged}>" in x), None),
        10.0,
        what="the decision line",
    )
    assert line is not None and "decision=accept reason=bad_address" in line
    log = rig.process.log()
    assert "reason=error" not in log
    assert "UnicodeEncodeError" not in log
    assert rig.primary.probes_for(recipient.decode("utf-8", "surrogateescape")) == 0
    samples = rig.process.samples()
    decisions = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "callahead_rcpt_decisions_total"
    }
    assert decisions[(("decision", "accept"), ("reason", "bad_address"))] >= 1
    assert all(value == 0 for labels, value in decisions.items() if ("reason", "error") in labels)
