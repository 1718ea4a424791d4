"""Tests of the scripted SMTP server: every knob of ``Script`` does what it says."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator

import aiosmtplib
import pytest

from tests.harness.scripted import Command, Script, ScriptedServer, Session, path_of
from tests.harness.tlsutil import client_context, server_context
from tests.harness.waiting import wait_for

TIMEOUT = 5.0


class Raw:
    """A bare-socket SMTP client: sends exact lines, reads replies line by line."""

    def __init__(self, server: ScriptedServer, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(server.address, timeout=timeout)
        self.file = self.sock.makefile("rb")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode("utf-8") + b"\r\n")

    def line(self) -> str:
        raw = self.file.readline()
        if not raw:
            raise EOFError("server closed the connection")
        return raw.decode("utf-8").rstrip("\r\n")

    def reply(self) -> list[str]:
        lines = [self.line()]
        while lines[-1][3:4] == "-":
            lines.append(self.line())
        return lines

    def cmd(self, line: str) -> str:
        """Send ``line``; return the last line of the reply."""
        self.send(line)
        return self.reply()[-1]

    def at_eof(self) -> bool:
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    with ScriptedServer(Script(users=frozenset({"alice@x.test"}))) as srv:
        yield srv


@pytest.fixture
def raw(server: ScriptedServer) -> Iterator[Raw]:
    client = Raw(server)
    yield client
    client.close()


def smtp(server: ScriptedServer) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, local_hostname="client.test", timeout=TIMEOUT)


# -- banner ------------------------------------------------------------------------------


def test_default_banner_and_ehlo(raw: Raw, server: ScriptedServer) -> None:
    assert raw.reply() == ["220 scripted.test ESMTP"]
    raw.send("EHLO client.test")
    assert raw.reply() == [
        "250-scripted.test",
        "250-PIPELINING",
        "250-8BITMIME",
        "250 SMTPUTF8",
    ]
    assert raw.cmd("NOOP") == "250 2.0.0 Ok"
    assert raw.cmd("VRFY alice").startswith("502 ")
    assert raw.cmd("quit") == "221 2.0.0 Bye"
    assert raw.at_eof()
    assert server.connections == 1
    assert server.commands[0] == Command(
        1,
        b"EHLO client.test\r\n",
        False,
        "250-scripted.test\n250-PIPELINING\n250-8BITMIME\n250 SMTPUTF8",
    )


def test_silent_banner() -> None:
    with ScriptedServer(Script(banner=None)) as server:
        with socket.create_connection(server.address, timeout=0.3) as sock:
            with pytest.raises(TimeoutError):
                sock.recv(1)
            sock.sendall(b"EHLO client.test\r\n")
            with pytest.raises(TimeoutError):
                sock.recv(1)
        assert server.connections == 1
        wait_for(lambda: server.commands, TIMEOUT, what="EHLO recorded")
        assert server.commands == [Command(1, b"EHLO client.test\r\n", False, None)]


def test_banner_delay() -> None:
    with ScriptedServer(Script(delay={"BANNER": 0.3})) as server:
        started = time.monotonic()
        client = Raw(server)
        assert client.line().startswith("220 ")
        assert time.monotonic() - started >= 0.3
        client.close()


@pytest.mark.parametrize(
    ("banner", "afterwards"),
    [
        pytest.param("421 4.3.2 scripted.test busy", [], id="421-closes"),
        pytest.param(
            "554 5.7.1 go away",
            [("EHLO client.test", "503 "), ("MAIL FROM:<>", "503 "), ("QUIT", "221 ")],
            id="554-then-only-quit",
        ),
    ],
)
def test_refusing_banner(banner: str, afterwards: list[tuple[str, str]]) -> None:
    """A 421 banner closes at once; after a 554 one, every command but QUIT gets 503."""
    with ScriptedServer(Script(banner=banner)) as server:
        with pytest.raises(smtplib.SMTPConnectError) as info:
            smtp(server)
        assert info.value.smtp_code == int(banner[:3])
        client = Raw(server)
        assert client.line() == banner
        for command, reply in afterwards:
            assert client.cmd(command).startswith(reply)
        assert client.at_eof()
        client.close()


def test_hang_up_at_banner() -> None:
    with ScriptedServer(Script(hang_up_at="BANNER")) as server:
        client = Raw(server)
        assert client.at_eof()  # accepted, then closed without a word
        client.close()
        assert server.connections == 1
        wait_for(lambda: server.open_connections == 0, TIMEOUT, what="session closed")
        assert server.commands == []


def test_multiline_banner(server: ScriptedServer) -> None:
    server.update(banner="220 scripted.test one\n220 two")
    client = Raw(server)
    assert client.reply() == ["220-scripted.test one", "220 two"]
    client.close()


# -- EHLO / HELO / MAIL -------------------------------------------------------------------


def test_ehlo_rejected_then_helo(server: ScriptedServer) -> None:
    server.update(ehlo="502 5.5.2 Error: command not recognized")
    with smtp(server) as client:
        code, _ = client.ehlo()
        assert code == 502
        code, _ = client.helo()
        assert code == 250
        assert client.mail("") == (250, b"2.1.0 Ok")
        assert client.rcpt("alice@x.test")[0] == 250
    assert [c.line.split(" ")[0] for c in server.commands] == [
        "ehlo",
        "helo",
        "mail",
        "rcpt",
        "QUIT",
    ]
    assert server.commands[0].reply == "502 5.5.2 Error: command not recognized"


def test_ehlo_custom_first_line_and_extensions(raw: Raw, server: ScriptedServer) -> None:
    server.update(ehlo="250 mx.other.test", extensions=("SIZE 1000", "STARTTLS"))
    raw.reply()
    raw.send("EHLO c")
    assert raw.reply() == ["250-mx.other.test", "250-SIZE 1000", "250 STARTTLS"]


def test_mail_rejected(server: ScriptedServer) -> None:
    server.update(mail="550 5.7.1 null sender not accepted")
    with smtp(server) as client:
        client.ehlo()
        assert client.mail("") == (550, b"5.7.1 null sender not accepted")
        assert client.rcpt("alice@x.test")[0] == 503  # no transaction
    assert server.count("MAIL") == 1


def test_mail_reply_per_sender(server: ScriptedServer) -> None:
    server.update(mail_by_sender={"": "553 5.7.1 <>: Sender address rejected: null sender"})
    with smtp(server) as client:
        client.ehlo()
        assert client.mail("")[0] == 553
        assert client.mail("probe@y.test") == (250, b"2.1.0 Ok")
        assert client.rcpt("alice@x.test")[0] == 250


def test_421_to_a_command_closes(raw: Raw, server: ScriptedServer) -> None:
    server.update(mail="421 4.3.2 Service shutting down")
    raw.reply()
    raw.cmd("EHLO c")
    assert raw.cmd("MAIL FROM:<>") == "421 4.3.2 Service shutting down"
    assert raw.at_eof()


def test_sequence_errors(raw: Raw) -> None:
    raw.reply()
    assert raw.cmd("MAIL FROM:<>").startswith("503 ")  # before EHLO
    raw.cmd("EHLO c")
    assert raw.cmd("RCPT TO:<alice@x.test>") == "503 5.5.1 Error: need MAIL command"
    assert raw.cmd("DATA") == "503 5.5.1 Error: need RCPT command"
    assert raw.cmd("MAIL FROM:<>").startswith("250 ")
    assert raw.cmd("MAIL FROM:<>") == "503 5.5.1 Error: nested MAIL command"
    assert raw.cmd("RCPT TO:<nobody@x.test>").startswith("550 ")
    assert raw.cmd("DATA") == "554 5.5.1 Error: no valid recipients"
    assert raw.cmd("RSET") == "250 2.0.0 Ok"
    assert raw.cmd("RCPT TO:<alice@x.test>").startswith("503 ")  # RSET ended it


# -- RCPT ---------------------------------------------------------------------------------


def test_rcpt_users_default_and_overrides(server: ScriptedServer) -> None:
    server.update(
        rcpt_overrides={"Temp@X.test": "451 4.3.0 try again later"},
        rcpt_default="550 5.1.1 <x>: Recipient address rejected: User unknown",
    )
    with smtp(server) as client:
        client.ehlo()
        client.mail("")
        assert client.rcpt("ALICE@x.test") == (250, b"2.1.5 Ok")
        assert client.rcpt("bob@x.test") == (
            550,
            b"5.1.1 <x>: Recipient address rejected: User unknown",
        )
        assert client.rcpt("temp@x.test") == (451, b"4.3.0 try again later")
        server.update(users=frozenset({"bob@x.test"}))  # live change, same session
        assert client.rcpt("bob@x.test")[0] == 250
    assert server.rcpts() == ["ALICE@x.test", "bob@x.test", "temp@x.test", "bob@x.test"]
    assert [c.reply for c in server.commands if c.line.startswith("rcpt")] == [
        "250 2.1.5 Ok",
        "550 5.1.1 <x>: Recipient address rejected: User unknown",
        "451 4.3.0 try again later",
        "250 2.1.5 Ok",
    ]


def test_rcpt_delay(server: ScriptedServer) -> None:
    server.update(delay={"RCPT": 0.3})
    with smtp(server) as client:
        client.ehlo()
        client.mail("")
        started = time.monotonic()
        assert client.rcpt("alice@x.test")[0] == 250
        assert time.monotonic() - started >= 0.3
        server.update(delay={})
        started = time.monotonic()
        assert client.rcpt("alice@x.test")[0] == 250
        assert time.monotonic() - started < 0.25


def test_rcpt_recorded_before_answer(server: ScriptedServer, raw: Raw) -> None:
    server.update(delay={"RCPT": 0.5})
    raw.reply()
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<>")
    raw.send("RCPT TO:<alice@x.test>")
    wait_for(lambda: server.rcpts(), 0.4, what="RCPT recorded")
    assert server.commands[-1].reply is None
    assert raw.reply() == ["250 2.1.5 Ok"]
    assert server.commands[-1].reply == "250 2.1.5 Ok"


def test_hang_up_at_rcpt(server: ScriptedServer) -> None:
    server.update(hang_up_at="RCPT")
    with smtp(server) as client:
        client.ehlo()
        client.mail("")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.rcpt("alice@x.test")
    assert server.commands[-1] == Command(1, b"rcpt TO:<alice@x.test>\r\n", False, None)


def test_delay_per_verb_and_hang_up_at_after_the_delay(server: ScriptedServer) -> None:
    server.update(delay={"MAIL": 0.3}, hang_up_at="MAIL")
    with smtp(server) as client:
        client.ehlo()
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.mail("")
        assert time.monotonic() - started >= 0.3
    assert server.verbs() == ["EHLO", "MAIL"]
    assert server.commands[-1].reply is None


def test_hang_up_after_a_reply(server: ScriptedServer, raw: Raw) -> None:
    server.update(hang_up_after="RCPT")
    raw.reply()
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<>")
    assert raw.cmd("RCPT TO:<alice@x.test>") == "250 2.1.5 Ok"
    assert raw.at_eof()


def test_rcpt_hook_sees_the_session_and_answers_or_hangs_up(server: ScriptedServer) -> None:
    seen: list[tuple[int, list[str], str]] = []

    def hook(session: Session, address: str) -> str | None:
        seen.append((session.number, session.rcpts(), address))
        if address.startswith("gone"):
            return None
        return "554 5.7.1 <>: Sender address rejected: Access denied"

    server.update(rcpt_hook=hook, users=frozenset({"bob@x.test"}))
    with smtp(server) as client:
        client.ehlo()
        client.mail("")
        assert client.rcpt("bob@x.test") == (
            554,
            b"5.7.1 <>: Sender address rejected: Access denied",
        )
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.rcpt("gone@x.test")
    assert seen == [
        (1, ["bob@x.test"], "bob@x.test"),
        (1, ["bob@x.test", "gone@x.test"], "gone@x.test"),
    ]
    assert server.commands[-1].reply is None


def test_pipelined_commands_answered_in_order(raw: Raw, server: ScriptedServer) -> None:
    raw.reply()
    raw.cmd("EHLO c")
    raw.sock.sendall(b"MAIL FROM:<>\r\nRCPT TO:<alice@x.test>\r\nRCPT TO:<bob@x.test>\r\nRSET\r\n")
    assert [raw.line()[:3] for _ in range(4)] == ["250", "250", "550", "250"]


# -- STARTTLS -----------------------------------------------------------------------------


def test_starttls_ok(server: ScriptedServer) -> None:
    server.update(extensions=("PIPELINING", "STARTTLS"))
    with smtp(server) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        code, _ = client.starttls(context=client_context())
        assert code == 220
        assert isinstance(client.sock, ssl.SSLSocket)
        client.ehlo()
        assert not client.has_extn("starttls")
        client.mail("")
        assert client.rcpt("alice@x.test")[0] == 250
        assert client.rcpt("bob@x.test")[0] == 550
    lines = [c.line for c in server.commands]
    assert lines == [
        "ehlo client.test",
        "STARTTLS",
        "ehlo client.test",
        "mail FROM:<>",
        "rcpt TO:<alice@x.test>",
        "rcpt TO:<bob@x.test>",
        "QUIT",
    ]


def test_starttls_with_aiosmtplib(server: ScriptedServer) -> None:
    server.update(extensions=("STARTTLS",))

    async def probe() -> tuple[int, int]:
        client = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            local_hostname="client.test",
            start_tls=False,
            timeout=TIMEOUT,
        )
        await client.connect()
        await client.ehlo()
        await client.starttls(tls_context=client_context())
        await client.ehlo()
        await client.mail("")
        ok = await client.execute_command(b"RCPT TO:<alice@x.test>")
        refused = await client.execute_command(b"RCPT TO:<bob@x.test>")
        await client.quit()
        return ok.code, refused.code

    assert asyncio.run(probe()) == (250, 550)


def test_starttls_not_offered(raw: Raw) -> None:
    raw.reply()
    raw.cmd("EHLO c")
    assert raw.cmd("STARTTLS") == "502 5.5.1 Error: command not implemented"


def test_starttls_refused(server: ScriptedServer) -> None:
    server.update(extensions=("STARTTLS",), starttls="454 4.7.0 TLS not available")
    with smtp(server) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPResponseException) as info:
            client.starttls(context=client_context())
        assert info.value.smtp_code == 454
        client.mail("")  # still usable in plain text
        assert client.rcpt("alice@x.test")[0] == 250


def test_starttls_broken(server: ScriptedServer) -> None:
    server.update(extensions=("STARTTLS",), tls="broken")
    client = smtp(server)
    client.ehlo()
    with pytest.raises(ssl.SSLError, match="WRONG_VERSION_NUMBER"):
        client.starttls(context=client_context())
    client.close()
    assert server.commands[-1] == Command(1, b"STARTTLS\r\n", False, "220 2.0.0 Ready to start TLS")

    async def probe() -> None:
        client = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, start_tls=False, timeout=TIMEOUT
        )
        await client.connect()
        await client.ehlo()
        try:
            await client.starttls(tls_context=client_context())
        finally:
            client.close()

    with pytest.raises(ssl.SSLError):
        asyncio.run(probe())
    assert server.connections == 2


def test_certificate_is_issued_by_the_test_ca_for_its_names() -> None:
    async def probe(server: ScriptedServer, name: str) -> object:
        client = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, start_tls=False, timeout=TIMEOUT
        )
        await client.connect()
        await client.ehlo()
        try:
            # Verified for real: the client trusts the test CA only, and checks the name.
            await client.starttls(server_hostname=name, tls_context=client_context())
            peer = client.get_transport_info("peercert")
            await client.quit()
        finally:
            client.close()
        return peer

    tls = server_context("mx.scripted.test")
    with ScriptedServer(Script(extensions=("STARTTLS",)), tls_context=tls) as server:
        peer = asyncio.run(probe(server, "mx.scripted.test"))
        assert isinstance(peer, dict)
        assert peer["subjectAltName"] == (("DNS", "mx.scripted.test"),)
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(probe(server, "other.test"))


# -- error limits ---------------------------------------------------------------------------


def test_max_errors_421_and_close(server: ScriptedServer, raw: Raw) -> None:
    server.update(max_errors=3)
    raw.reply()
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<>")
    assert raw.cmd("RCPT TO:<a@x.test>").startswith("550 ")
    assert raw.cmd("RCPT TO:<b@x.test>").startswith("550 ")
    assert raw.cmd("RCPT TO:<c@x.test>").startswith("550 ")
    # The 421 follows at once, without another command, then the server hangs up.
    assert raw.line() == "421 4.7.0 Error: too many errors"
    assert raw.at_eof()
    assert server.count("rcpt") == 3


def test_max_errors_counts_every_error_reply(server: ScriptedServer) -> None:
    server.update(max_errors=2, mail="451 4.3.0 later")
    with smtp(server) as client:
        client.ehlo()
        assert client.mail("")[0] == 451
        assert client.rcpt("alice@x.test")[0] == 503
        # smtplib reads the pending 421 as the reply to the next command.
        assert client.noop()[0] == 421


def test_soft_error_limit_sleeps(server: ScriptedServer, raw: Raw) -> None:
    server.update(soft_error_limit=1, error_sleep=0.2)
    raw.reply()
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<>")
    started = time.monotonic()
    assert raw.cmd("RCPT TO:<a@x.test>").startswith("550 ")  # the 1st error: no sleep
    assert time.monotonic() - started < 0.15
    started = time.monotonic()
    assert raw.cmd("RCPT TO:<alice@x.test>").startswith("250 ")  # every reply now waits
    assert raw.cmd("NOOP").startswith("250 ")
    assert time.monotonic() - started >= 0.4


def test_delivery_resets_error_count(server: ScriptedServer) -> None:
    server.update(max_errors=2)
    with smtp(server) as client:
        client.ehlo()
        client.mail("sender@y.test")
        assert client.rcpt("nobody@x.test")[0] == 550  # 1 error
        assert client.rcpt("alice@x.test")[0] == 250
        assert client.data(b"Subject: hi\r\n\r\nbody\r\n")[0] == 250  # count reset
        client.mail("sender@y.test")
        assert client.rcpt("nobody@x.test")[0] == 550  # 1 error again, not 2
        assert client.rcpt("alice@x.test")[0] == 250


# -- delivery ---------------------------------------------------------------------------------


def test_full_delivery(server: ScriptedServer) -> None:
    message = b"Subject: test\r\n\r\nline one\r\n.starts with a dot\r\n..two dots\r\nend\r\n"
    with smtp(server) as client:
        refused = client.sendmail("sender@y.test", ["alice@x.test", "bob@x.test"], message)
    assert refused == {"bob@x.test": (550, b"5.1.1 User unknown")}
    assert server.messages == [message]
    assert server.mailbox("ALICE@x.test") == [message]
    assert server.mailbox("bob@x.test") == []
    delivery = server.deliveries[0]
    assert (delivery.session, delivery.sender, delivery.recipients) == (
        1,
        "sender@y.test",
        ("alice@x.test",),
    )
    assert [c.line for c in server.commands][-2:] == [".", "QUIT"]
    assert server.commands[-2].reply == "250 2.0.0 Ok: queued"


def test_data_rejected(server: ScriptedServer) -> None:
    server.update(data="451 4.3.0 no DATA today")
    with smtp(server) as client, pytest.raises(smtplib.SMTPDataError):
        client.sendmail("s@y.test", ["alice@x.test"], b"x\r\n")
    server.update(data="354 go", data_end="552 5.3.4 too big")
    with smtp(server) as client, pytest.raises(smtplib.SMTPDataError):
        client.sendmail("s@y.test", ["alice@x.test"], b"x\r\n")
    assert server.messages == []


# -- records ------------------------------------------------------------------------------------


def test_exact_lines_quoted_and_utf8(server: ScriptedServer, raw: Raw) -> None:
    server.update(users=frozenset({"jörg@x.test"}))
    raw.reply()
    raw.cmd("EHLO c")
    raw.cmd("MAIL FROM:<> SMTPUTF8")
    assert raw.cmd('RCPT TO:<"john doe"@x.test>').startswith("550 ")
    assert raw.cmd("RCPT TO:<jörg@x.test> ").startswith("250 ")
    assert (
        raw.cmd("rcpt to:<Alice@X.test> NOTIFY=NEVER ORCPT=rfc822;a@x.test")
        == "550 5.1.1 User unknown"
    )
    raw.sock.sendall(b"RCPT TO:<\xff@x.test>\r\n")  # not UTF-8 at all
    assert raw.reply()[0].startswith("550 ")
    assert server.rcpt_lines() == [
        'RCPT TO:<"john doe"@x.test>',
        "RCPT TO:<jörg@x.test> ",
        "rcpt to:<Alice@X.test> NOTIFY=NEVER ORCPT=rfc822;a@x.test",
        "RCPT TO:<\udcff@x.test>",
    ]
    assert server.rcpts() == ['"john doe"@x.test', "jörg@x.test", "Alice@X.test", "\udcff@x.test"]
    assert server.count("rcpt") == 4
    assert server.count("RCPT TO") == 4
    assert server.count("mail") == 1
    assert server.sessions_with_rcpt() == 1


def test_sessions_record_raw_lines_split_at_lf_and_tls(server: ScriptedServer) -> None:
    server.update(extensions=("STARTTLS",))
    raw = Raw(server)
    raw.reply()
    raw.sock.sendall(b"EHLO c\r\nNOOP\nRSET\r\n")  # a bare LF ends a line too
    assert [raw.reply()[-1][:3] for _ in range(3)] == ["250", "250", "250"]
    assert raw.cmd("STARTTLS").startswith("220 ")
    tls = client_context().wrap_socket(raw.sock, server_hostname="127.0.0.1")
    tls.sendall(b"EHLO c\r\n")
    assert tls.recv(1024).startswith(b"250")
    tls.close()
    raw.file.close()
    wait_for(lambda: server.sessions[0].closed, TIMEOUT, what="session closed")
    [session] = server.sessions
    assert session.raw == [b"EHLO c\r\n", b"NOOP\n", b"RSET\r\n", b"STARTTLS\r\n", b"EHLO c\r\n"]
    assert session.lines == ["EHLO c", "NOOP", "RSET", "STARTTLS", "EHLO c"]
    assert session.over_tls == [False, False, False, False, True]
    assert session.verbs() == ["EHLO", "NOOP", "RSET", "STARTTLS", "EHLO"]
    assert server.raw == session.raw
    assert server.open_connections == 0


def test_path_of() -> None:
    assert path_of("RCPT TO:<a@b>") == "a@b"
    assert path_of("RCPT TO: <a@b> NOTIFY=NEVER") == "a@b"
    assert path_of('RCPT TO:<"a>b"@c>') == '"a>b"@c'
    assert path_of("MAIL FROM:<>") == ""
    assert path_of("MAIL FROM:a@b SIZE=1") == "a@b"


def test_sessions_count_and_clear(server: ScriptedServer) -> None:
    for _ in range(2):
        with smtp(server) as client:
            client.ehlo()
            client.mail("")
            client.rcpt("alice@x.test")
    with smtp(server) as client:
        client.noop()
    assert server.connections == 3
    assert server.sessions_with_rcpt() == 2
    assert {c.session for c in server.commands} == {1, 2, 3}
    server.clear()
    assert server.commands == []
    assert server.connections == 3


def test_update_rejects_unknown_fields(server: ScriptedServer) -> None:
    with pytest.raises(TypeError):
        server.update(no_such_field=1)
    with pytest.raises(ValueError):
        server.update(tls="maybe")
    server.update(rcpt_ok="250 fine", users=frozenset({"z@x.test"}))
    assert server.script.rcpt_reply("Z@x.test") == "250 fine"


# -- lifecycle ----------------------------------------------------------------------------------


def test_stop_aborts_connections_and_restart_on_same_port() -> None:
    server = ScriptedServer()
    server.start()
    port = server.port
    try:
        idle = Raw(server)
        assert idle.line().startswith("220 ")
        server.stop()
        with pytest.raises((EOFError, ConnectionError)):
            idle.line()
        idle.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(server.address, timeout=TIMEOUT)
        server.start()
        assert server.port == port
        with smtp(server) as client:
            assert client.noop()[0] == 250
        server.restart()
        with smtp(server) as client:
            assert client.noop()[0] == 250
        assert server.connections == 3
        assert [c.session for c in server.commands] == [2, 2, 3, 3]
    finally:
        server.stop()
    assert not server.running
