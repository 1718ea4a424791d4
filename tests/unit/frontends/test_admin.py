"""The admin socket and the commands that use it: a real unix socket served on a real
probe loop, asked by the real command line."""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from callahead.caching import cachefile
from callahead.caching.cache import PositiveCache
from callahead.frontends.admin import AdminError, AdminServer, Health, primary_problem
from callahead.frontends.adminclient import ask
from callahead.probing.engine import PrimaryState
from callahead.probing.loop import ProbeLoop
from callahead.process.cli import EX_UNAVAILABLE, main
from callahead.smtp.verdict import Verdict
from tests.harness.asuser import ALLOWED, as_user

UP = PrimaryState("[192.0.2.1]:25", 2, False, True, False, Verdict.VALID, "2.1.5 Ok", 1.5)
DOWN = PrimaryState("[192.0.2.2]:25", 0, True, False, False, Verdict.TEMPFAIL, "refused", 0.5)


class Running:
    """A cache, a health report the test can change, and the admin server on a loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cache = PositiveCache(ttl=3600, maxsize=100)
        self.health = Health(True, 0.1, [UP], False)
        self.loop = ProbeLoop()
        self.loop.start()
        self.server = AdminServer(
            self.cache, lambda: self.health, lambda: {"hits": 3.0, "misses": 1.0}, "/c.json"
        )
        self.loop.run(self.server.start(str(path)), timeout=5)

    def cli(self, *args: str) -> int:
        return main(list(args), env={"CALLAHEAD_ADMIN_SOCKET": str(self.path)})

    def close(self) -> None:
        self.loop.run(self.server.aclose(), timeout=5)
        self.loop.stop()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    served = Running(tmp_path / "admin.sock")
    yield served
    served.close()


def test_the_socket_is_mode_0600_and_removed_at_stop(tmp_path: Path) -> None:
    served = Running(tmp_path / "admin.sock")
    assert stat.S_IMODE(os.stat(served.path).st_mode) == 0o600
    served.close()
    assert not served.path.exists()


def test_only_root_and_the_services_own_user_get_in_not_its_group() -> None:
    """Under the unit the socket's group is postfix: a member of that group (any
    Postfix process) is refused, as is anyone else; root is answered."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to connect as another user")
    nobody = pwd.getpwnam("nobody").pw_uid
    directory = Path(tempfile.mkdtemp(prefix="callahead-admin-"))
    try:
        directory.chmod(0o755)  # anyone may enter: the socket's own mode decides
        served = Running(directory / "admin.sock")
        try:
            group = os.stat(served.path).st_gid
            assert as_user(nobody, group, served.path) == errno.EACCES
            assert main(["status"], env={"CALLAHEAD_ADMIN_SOCKET": str(served.path)}) == 0
            # The same member of the socket's group got in with the former mode 0660.
            served.path.chmod(0o660)
            assert as_user(nobody, group, served.path) == ALLOWED
        finally:
            served.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_cache_show(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert running.cli("cache", "show", "A@Example.COM") == 1
    assert capsys.readouterr().out == "A@example.com: not cached\n"
    running.cache.add("A@example.com")
    assert running.cli("cache", "show", "<A@EXAMPLE.com>") == 0
    assert capsys.readouterr().out in (
        "A@example.com: cached, 3600 s left\n",
        "A@example.com: cached, 3599 s left\n",
    )


def test_cache_flush_address_domain_and_all(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    for address in ("a@example.com", "b@example.com", "c@example.org", "d@example.org"):
        running.cache.add(address)
    assert running.cli("cache", "flush", "a@example.com") == 0
    assert capsys.readouterr().out == "flushed 1 entry\n"
    assert "a@example.com" not in running.cache
    assert running.cli("cache", "flush", "@EXAMPLE.org") == 0
    assert capsys.readouterr().out == "flushed 2 entries\n"
    assert running.cli("cache", "flush", "--all") == 0
    assert capsys.readouterr().out == "flushed 1 entry\n"
    assert len(running.cache) == 0


def test_cache_stats(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    running.cache.add("a@example.com")
    assert running.cli("cache", "stats") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "enabled: yes",
        "entries: 1",
        "size: 100",
        "ttl: 3600",
        "file: /c.json",
        "hits: 3",
        "misses: 1",
    ]


def test_status_healthy_and_degraded(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    assert running.cli("status") == 0
    out = capsys.readouterr().out
    assert out.startswith("callahead: healthy\nprobe loop: alive")
    assert "primary [192.0.2.1]:25: breaker closed, 2 pool sessions, last probe valid" in out

    running.health = Health(True, 0.1, [UP, DOWN], False)
    assert running.cli("status") == 1
    out = capsys.readouterr().out
    assert out.startswith("callahead: degraded\n")
    assert "[192.0.2.2]:25: breaker open, 0 pool sessions, last probe tempfail" in out
    assert "DEGRADED: treated as down (breaker open)" in out

    running.health = Health(False, 7.5, [UP], True)
    assert running.cli("status") == 1
    out = capsys.readouterr().out
    assert "probe loop: STALLED (no beat for 7.5 s)" in out
    assert "dry run: yes" in out


def test_what_makes_a_primary_degraded() -> None:
    assert primary_problem(UP) is None
    never = PrimaryState("[192.0.2.3]:25", 0, False, False, False)
    assert primary_problem(never) is None  # not probed yet: nothing known against it
    refusing = PrimaryState("[192.0.2.4]:25", 1, False, True, True, Verdict.TEMPFAIL, "", 1.0)
    assert (
        primary_problem(refusing) == "refuses the probes (its recipients are accepted unverified)"
    )
    unreached = PrimaryState("[192.0.2.5]:25", 0, False, False, False, Verdict.TEMPFAIL, "", 1.0)
    assert primary_problem(unreached) == "not reached by the last probe"


def test_without_a_running_serve_the_commands_exit_69(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {"CALLAHEAD_ADMIN_SOCKET": str(tmp_path / "none.sock")}
    assert main(["status"], env=env) == EX_UNAVAILABLE
    assert main(["cache", "stats"], env=env) == EX_UNAVAILABLE
    assert "callahead serve is not running" in capsys.readouterr().err
    assert main(["status"], env={"CALLAHEAD_ADMIN_SOCKET": ""}) == EX_UNAVAILABLE


def test_bad_requests_get_an_error_answer(running: Running) -> None:
    assert ask(str(running.path), {"op": "nonsense"}) == {
        "ok": False,
        "error": "unknown op 'nonsense'",
    }
    assert ask(str(running.path), {"op": "cache-show", "address": "nobody"})["ok"] is False
    assert ask(str(running.path), {"op": "cache-flush"})["ok"] is False
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(running.path))
        raw.sendall(b"not json\n")
        assert b'"ok": false' in raw.recv(4096)
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(running.path))
        raw.sendall(b"x" * (70 * 1024) + b"\n")
        assert b"request longer than" in raw.recv(4096)
    # The server still answers after all that.
    assert ask(str(running.path), {"op": "cache-stats"})["ok"] is True


def test_a_stale_socket_is_replaced_and_a_live_one_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: a callahead that died
    served = Running(path)
    try:
        assert ask(str(path), {"op": "status"})["ok"] is True
        second = AdminServer(PositiveCache(ttl=1, maxsize=1), lambda: served.health, dict)
        with pytest.raises(AdminError, match="another process answers"):
            served.loop.run(second.start(str(path)), timeout=5)
        assert ask(str(path), {"op": "status"})["ok"] is True
    finally:
        served.close()


def test_a_file_that_is_not_a_socket_is_never_touched(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    path.write_text("precious")
    loop = ProbeLoop()
    loop.start()
    try:
        server = AdminServer(
            PositiveCache(ttl=1, maxsize=1), lambda: Health(True, 0, [], False), dict
        )
        with pytest.raises(AdminError, match="is not a socket"):
            loop.run(server.start(str(path)), timeout=5)
    finally:
        loop.stop()
    assert path.read_text() == "precious"


def test_a_flush_is_saved_to_the_cache_file_before_the_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash (or a watchdog abort) right after `callahead cache flush` must not bring
    the entry back from the file at the next start: the file is saved at once, not at
    the next periodic save."""
    path = tmp_path / "cache.json"
    cache = PositiveCache(ttl=3600, maxsize=100)
    for address in ("gone@example.com", "kept@example.com", "x@other.example"):
        cache.add(address)
    cachefile.save_from(cache, str(path))
    saver = cachefile.SaveAfterChange(cache, str(path))
    loop = ProbeLoop()
    loop.start()
    server = AdminServer(
        cache, lambda: Health(True, 0.1, [], False), dict, str(path), save=saver.save
    )
    loop.run(server.start(str(tmp_path / "admin.sock")), timeout=5)
    env = {"CALLAHEAD_ADMIN_SOCKET": str(tmp_path / "admin.sock")}
    try:
        assert main(["cache", "flush", "gone@example.com"], env=env) == 0
        assert saved(path) == {"kept@example.com", "x@other.example"}
        assert main(["cache", "flush", "@other.example"], env=env) == 0
        assert saved(path) == {"kept@example.com"}
        assert main(["cache", "flush", "--all"], env=env) == 0
        assert saved(path) == set()
        assert capsys.readouterr().err == ""
        assert saver.saves == 3

        path.unlink()
        path.mkdir()  # cannot be replaced: the save fails, and the command says so
        cache.add("new@example.com")
        assert main(["cache", "flush", "new@example.com"], env=env) == 0
        assert "the cache file could not be saved" in capsys.readouterr().err
    finally:
        loop.run(server.aclose(), timeout=5)
        loop.stop()


def saved(path: Path) -> set[str]:
    return {address for address, _ in cachefile.load(str(path))}
