"""Self-test of the harness: no milter involved anywhere here."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import fixtures
from tests.harness.ports import free_port
from tests.harness.postfix import (
    SNIPPET,
    Listener,
    PostfixError,
    PostfixInstance,
    backup_mx_main_cf,
    postfix_available,
    primary_main_cf,
    smtp_nexthop,
    snippet_settings,
    write_virtual_users,
)
from tests.harness.primary import Primary, RcptRecord, SilentServer
from tests.harness.serverdirs import ServerDirError, server_dir
from tests.harness.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
REPLACED = {"relay_domains", "transport_maps", "smtpd_milters"}

tmp_workdir = fixtures.tmp_workdir

_ok, _why = postfix_available()
needs_postfix = pytest.mark.skipif(not _ok, reason=_why)

MESSAGE = b"From: sender@elsewhere.test\r\nSubject: harness\r\n\r\nhello\r\n"


def _connect_refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


# --- waiting / ports ---------------------------------------------------------------


def test_wait_for_returns_the_truthy_value() -> None:
    calls = iter([0, "", None, 42])
    assert wait_for(lambda: next(calls), timeout=5, interval=0.001) == 42


def test_wait_for_times_out_with_a_message() -> None:
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timed out after 0.1s waiting for godot"):
        wait_for(lambda: False, timeout=0.1, interval=0.01, what="godot")
    assert time.monotonic() - start < 1


def test_free_port_is_never_handed_out_twice() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50


# --- Primary / SilentServer --------------------------------------------------------


def test_primary_answers_records_and_restarts() -> None:
    with Primary(["Alice@Example.test"], hostname="primary.test") as primary:
        client = smtplib.SMTP(primary.host, primary.port, local_hostname="client.test")
        code, banner = client.ehlo()
        assert code == 250
        assert banner.split(b"\n")[0] == b"primary.test"

        # A call-ahead probe: null sender, one known and one unknown recipient.
        assert client.mail("") == (250, b"2.1.0 OK")
        assert client.rcpt("alice@EXAMPLE.test") == (250, b"2.1.5 OK")
        code, text = client.rcpt("bob@example.test")
        assert code == 550
        assert text == (
            b"5.1.1 <bob@example.test>: Recipient address rejected: "
            b"User unknown in virtual mailbox table"
        )
        client.rset()

        # A real message.
        client.sendmail("sender@elsewhere.test", ["ALICE@example.test"], MESSAGE)

        assert primary.connections == 1
        assert primary.mail_froms == ["", "sender@elsewhere.test"]
        assert primary.rcpts == [
            RcptRecord("", "alice@EXAMPLE.test", 250),
            RcptRecord("", "bob@example.test", 550),
            RcptRecord("sender@elsewhere.test", "ALICE@example.test", 250),
        ]
        assert primary.probes_for("Alice@example.test") == 1
        assert primary.probes_for("bob@example.test") == 1
        assert primary.mailbox("alice@example.test") == [MESSAGE]
        assert primary.messages[0].recipients == ("ALICE@example.test",)

        # Users can change while running.
        primary.add_user("bob@example.test")
        primary.remove_user("ALICE@example.test")
        client.mail("")
        assert client.rcpt("bob@example.test")[0] == 250
        assert client.rcpt("alice@example.test")[0] == 550
        client.rset()

        # stop() closes the open session and the listening socket.
        primary.stop()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
        assert _connect_refused(primary.host, primary.port)

        # ... and start() brings it back on the same port, records kept.
        for _ in range(3):
            primary.start()
            with smtplib.SMTP(primary.host, primary.port) as again:
                assert again.noop()[0] == 250
            primary.stop()
            assert _connect_refused(primary.host, primary.port)
        assert primary.connections == 4
        assert primary.probes_for("bob@example.test") == 2
        primary.start()
    assert _connect_refused(primary.host, primary.port)


def test_primary_null_sender_rejection_and_overrides() -> None:
    with Primary(["a@example.test"], reject_null_sender=True) as primary:
        with smtplib.SMTP(primary.host, primary.port) as client:
            client.ehlo()
            assert client.mail("") == (550, b"5.7.1 null sender not accepted")
            client.rset()
            primary.set_rcpt_reply("a@example.test", "451 4.3.0 try again later")
            client.mail("x@elsewhere.test")
            assert client.rcpt("a@example.test") == (451, b"4.3.0 try again later")
        assert primary.mail_froms == ["", "x@elsewhere.test"]
        assert primary.rcpts == [RcptRecord("x@elsewhere.test", "a@example.test", 451)]
        assert primary.probes_for("a@example.test") == 0


def test_silent_server_accepts_and_never_answers() -> None:
    with SilentServer() as silent:
        sock = socket.create_connection(("127.0.0.1", silent.port), timeout=1)
        sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert silent.connections == 1
        silent.stop()
        sock.settimeout(2)
        assert sock.recv(1) == b""  # closed by stop()
        sock.close()
        assert _connect_refused("127.0.0.1", silent.port)
        silent.start()
        socket.create_connection(("127.0.0.1", silent.port), timeout=1).close()
        wait_for(lambda: silent.connections == 2, 2, what="second connection")


def test_primary_main_runs_in_the_foreground() -> None:
    port = free_port()
    argv = [sys.executable, "-m", "tests.harness.primary", "--port", str(port)]
    argv += ["--user", "a@example.test"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"listening on 127.0.0.1:{port}" in first
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.ehlo()
            client.mail("")
            client.rcpt("a@example.test")
            client.rcpt("b@example.test")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        lines = out.splitlines()
        assert lines[0] == "RCPT from=<> to=<a@example.test> -> 250 2.1.5 OK"
        assert lines[1].startswith("RCPT from=<> to=<b@example.test> -> 550 5.1.1 ")
        assert lines[-1] == "primary stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- main.cf building ---------------------------------------------------------------


def test_snippet_settings_parses_main_cf_syntax(tmp_path: Path) -> None:
    snippet = tmp_path / "main.cf"
    snippet.write_text(
        "# comment\n"
        "a = 1\n"
        "\n"
        "b = x,\n"
        "    y\n"
        "  # indented comment\n"
        "\tz\n"
        "c =\n"
        "d = value # not a comment\n"
    )
    assert snippet_settings(snippet) == {
        "a": "1",
        "b": "x, y z",
        "c": "",
        "d": "value # not a comment",
    }


def test_backup_main_cf_keeps_the_production_snippet(tmp_path: Path) -> None:
    production = snippet_settings(SNIPPET)
    assert production.keys() >= REPLACED
    cf = backup_mx_main_cf(
        SNIPPET,
        workdir=tmp_path,
        relay_domains=["a.test", "b.test"],
        transports={"a.test": smtp_nexthop(2525), "b.test": "[127.0.0.1]:2526"},
        milter="inet:127.0.0.1:9999",
    )
    for key, value in production.items():
        if key not in REPLACED:
            assert cf[key] == value, key
    assert cf["relay_domains"] == "a.test, b.test"
    assert (
        cf["transport_maps"]
        == "inline:{a.test=smtp:[127.0.0.1]:2525, b.test=smtp:[127.0.0.1]:2526}"
    )
    assert cf["smtpd_milters"] == "inet:127.0.0.1:9999"
    assert cf["mynetworks"] == "192.0.2.0/24"
    assert list(cf)[: len(production)] == list(production)


def test_listener_master_cf_line() -> None:
    line = Listener(2525, {"smtpd_milters": "", "smtpd_banner": "x $myhostname"}).master_cf_line()
    assert line == (
        "127.0.0.1:2525 inet n - n - - smtpd -o smtpd_milters= -o { smtpd_banner = x $myhostname }"
    )
    with pytest.raises(ValueError):
        Listener(2525, {"bad key": "x"})
    with pytest.raises(ValueError):
        Listener(2525, {"k": "inline:{a=b"})


# --- real Postfix -------------------------------------------------------------------


@pytest.fixture
def relay_primary() -> Iterator[Primary]:
    with Primary(["user@relay.test"]) as primary:
        yield primary


@pytest.mark.integration
@needs_postfix
def test_backup_relays_queues_and_flushes(tmp_workdir: Path, relay_primary: Primary) -> None:
    port, other_port = free_port(), free_port()
    cf = backup_mx_main_cf(
        SNIPPET,
        workdir=tmp_workdir,
        relay_domains=["relay.test"],
        transports={"relay.test": smtp_nexthop(relay_primary.port)},
        milter=None,
    )
    listeners = [Listener(port), Listener(other_port, {"smtpd_banner": "second listener"})]
    with PostfixInstance(tmp_workdir, cf, listeners) as backup:
        # The -o override of the second listener is in effect.
        second = smtplib.SMTP()
        code, banner = second.connect("127.0.0.1", other_port)
        second.close()
        assert (code, banner) == (220, b"second listener")

        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test") as client:
            # 127.0.0.1 is not in mynetworks: relaying elsewhere is refused.
            client.mail("sender@elsewhere.test")
            code, text = client.rcpt("someone@outside.test")
            assert code == 454 and b"Relay access denied" in text
            client.rset()
            client.sendmail("sender@elsewhere.test", ["user@relay.test"], MESSAGE)
        delivered = wait_for(
            lambda: relay_primary.mailbox("user@relay.test"), 10, what="relay to the primary"
        )
        assert delivered[0].endswith(MESSAGE.split(b"\r\n\r\n")[1])
        assert relay_primary.messages[0].sender == "sender@elsewhere.test"
        wait_for(lambda: not backup.queue_ids(), 10, what="the queue to empty")

        # Primary down: the message stays in the backup's queue.
        relay_primary.stop()
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail("sender@elsewhere.test", ["USER@relay.test"], MESSAGE)
        backup.wait_for_log(r"to=<USER@relay\.test>.*status=deferred \(connect to")
        assert len(backup.queue_ids()) == 1
        assert len(relay_primary.mailbox("user@relay.test")) == 1

        # Primary back: a flush delivers it and the queue empties.
        relay_primary.start()
        backup.flush()
        wait_for(lambda: len(relay_primary.mailbox("user@relay.test")) == 2, 10, what="redelivery")
        wait_for(lambda: not backup.queue_ids(), 10, what="the queue to empty")
        assert relay_primary.connections == 2

    assert not backup.running
    assert _connect_refused("127.0.0.1", port)


@pytest.mark.integration
@needs_postfix
def test_postfix_primary_knows_its_users(tmp_workdir: Path) -> None:
    port = free_port()
    cf = primary_main_cf(workdir=tmp_workdir, users=["alice@example.test"])
    with PostfixInstance(tmp_workdir, cf, [Listener(port)]) as primary:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="backup.test") as client:
            assert client.mail("")[0] == 250
            assert client.rcpt("Alice@example.test")[0] == 250
            code, text = client.rcpt("bob@example.test")
            assert code == 550
            assert text.startswith(b"5.1.1 <bob@example.test>: Recipient address rejected:")
            assert b"User unknown in virtual mailbox table" in text
            client.rset()
            client.sendmail("sender@elsewhere.test", ["alice@example.test"], MESSAGE)
        wait_for(lambda: primary.mailbox_count("alice@example.test") == 1, 10, what="delivery")
        assert primary.mailbox("ALICE@example.test")[0].endswith(b"\nhello\n")
        # Postfix's default error limits are untouched on the primary.
        assert "smtpd_soft_error_limit" not in primary.main_cf

        # A new user plus reload; postconf() changes main.cf and reloads.
        write_virtual_users(tmp_workdir, ["alice@example.test", "carol@example.test"])
        primary.reload()
        primary.postconf(smtpd_banner="reloaded $myhostname")
        client = smtplib.SMTP()
        assert client.connect("127.0.0.1", port) == (220, b"reloaded primary.test")
        client.ehlo("backup.test")
        client.mail("")
        assert client.rcpt("carol@example.test")[0] == 250
        client.quit()


@pytest.mark.integration
@needs_postfix
def test_failed_start_shows_the_maillog_and_leaves_nothing_running(tmp_workdir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        cf = primary_main_cf(workdir=tmp_workdir, users=["a@example.test"])
        instance = PostfixInstance(tmp_workdir, cf, [Listener(busy)])
        with pytest.raises(PostfixError, match="Address already in use"):
            instance.start()
        assert not instance.running


def test_the_containers_mirror_is_debians_not_a_third_partys() -> None:
    # The first source listed may be a third party's (nodesource, seen on a CI machine):
    # debootstrap from it failed to find bookworm's Release file.
    from tests.harness.container import _entries

    text = (
        "deb [arch=amd64 signed-by=/k.gpg] https://deb.nodesource.com/node_20.x nodistro main\n"
        "\n"
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    usable = [u for u, suites, parts in _entries(text) if "bookworm" in suites and "main" in parts]
    assert usable == ["http://deb.debian.org/debian"]


def test_server_dir_is_reachable_from_a_0700_parent() -> None:
    """A directory made by server_dir can be traversed by an unprivileged user even when
    the code asking for it sits under a 0700 directory (a checkout in /root)."""
    with fixtures.make_workdir() as work:
        root = work / "servers"
        made = server_dir("peer", "debs", root=root)
        assert made == root / "peer" / "debs"
        for directory in (root, root / "peer", made):
            info = directory.lstat()
            assert info.st_uid == 0
            assert stat.S_IMODE(info.st_mode) == 0o755
        reach = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "test",
                "-x",
                str(made),
            ],
            check=False,
        )
        assert reach.returncode == 0


@pytest.mark.parametrize("bad", ["symlink", "writable", "foreign"])
def test_server_dir_refuses_an_unsafe_directory(bad: str) -> None:
    with fixtures.make_workdir() as work:
        root = work / "servers"
        root.mkdir(mode=0o755)
        target = root / "peer"
        if bad == "symlink":
            (work / "elsewhere").mkdir()
            target.symlink_to(work / "elsewhere")
        else:
            target.mkdir()
            if bad == "writable":
                target.chmod(0o777)
            else:
                os.chown(target, 65534, 65534)
        with pytest.raises(ServerDirError):
            server_dir("peer", root=root)
