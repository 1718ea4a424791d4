"""The start-time check that Postfix's user can connect to callahead's unix sockets
(``callahead.socketaccess``), on real directories with the modes and groups it reads."""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from callahead.process.config import load_config
from callahead.process.socketaccess import (
    Account,
    account,
    local_exposure,
    postfix_socket_problems,
    reach_problem,
    unix_reach,
)
from tests.harness.asuser import ALLOWED, as_user
from tests.harness.fixtures import make_workdir

from .test_config import env_with

# Neither this process's uid nor its gids: reaches a file only by its "other" bits or
# by the group given in a test.
STRANGER = Account("postfix", 4242, frozenset({4242}))


@pytest.fixture
def spool() -> Iterator[Path]:
    with make_workdir() as workdir:
        yield workdir


def in_group(gid: int) -> Account:
    return Account("postfix", 4242, frozenset({4242, gid}))


def test_group_writable_socket_in_the_postfix_group_is_reachable(spool: Path) -> None:
    directory = spool / "callahead"
    directory.mkdir(mode=0o750)
    os.chmod(directory, 0o750)
    # The process's primary group is the group Postfix's user is in.
    who = in_group(os.getegid())
    assert reach_problem(str(directory / "milter.sock"), who, umask=0o007) is None
    # The same socket with the unit's old UMask=0077: owner only.
    problem = reach_problem(str(directory / "milter.sock"), who, umask=0o077)
    assert problem is not None and "cannot write" in problem


def test_a_primary_group_postfix_is_not_in_is_reported(spool: Path) -> None:
    """The issue's case: mode 0770, but the group is the process's own (DynamicUser's),
    and postfix is only a supplementary group of the process, not of the socket."""
    directory = spool / "callahead"
    directory.mkdir()
    os.chmod(directory, 0o755)
    problem = reach_problem(str(directory / "milter.sock"), STRANGER, umask=0o007)
    assert problem is not None
    assert "srwxrwx---" in problem and "Group=postfix" in problem


def test_a_setgid_directory_gives_its_group_to_the_socket(spool: Path) -> None:
    directory = spool / "callahead"
    directory.mkdir()
    gid = 4343 if os.getegid() != 4343 else 4344
    os.chown(directory, -1, gid)
    os.chmod(directory, 0o2750)
    assert reach_problem(str(directory / "m.sock"), in_group(gid), umask=0o007) is None


def test_a_directory_postfix_cannot_enter_is_reported(spool: Path) -> None:
    directory = spool / "private"
    directory.mkdir()
    os.chmod(directory, 0o700)
    problem = reach_problem(str(directory / "m.sock"), in_group(os.getegid()), umask=0)
    assert problem is not None and "cannot enter" in problem and str(directory) in problem


def test_a_missing_directory_is_reported(spool: Path) -> None:
    problem = reach_problem(str(spool / "absent" / "m.sock"), STRANGER, umask=0)
    assert problem is not None and "does not exist" in problem


def test_the_check_matches_a_real_connect(spool: Path) -> None:
    """What the check predicts is what bind() gives: the mode and group of a socket
    bound under the umask the check assumed."""
    directory = spool / "callahead"
    directory.mkdir()
    os.chmod(directory, 0o755)
    path = directory / "real.sock"
    old = os.umask(0o007)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(path))
            info = os.stat(path)
    finally:
        os.umask(old)
    assert info.st_mode & 0o777 == 0o770 and info.st_gid == os.getegid()
    path.unlink()
    assert reach_problem(str(path), in_group(info.st_gid), umask=0o007) is None
    assert reach_problem(str(path), STRANGER, umask=0o007) is not None


def test_only_unix_sockets_are_checked(spool: Path) -> None:
    directory = spool / "closed"
    directory.mkdir()
    os.chmod(directory, 0o700)
    config = load_config(
        env_with(
            CALLAHEAD_SOCKET=f"unix:{directory}/milter.sock",
            CALLAHEAD_POLICY_LISTEN=f"unix:{directory}/policy.sock",
        )
    )
    problems = postfix_socket_problems(config, STRANGER)
    assert [p.split("=", 1)[0] for p in problems] == [
        "CALLAHEAD_SOCKET",
        "CALLAHEAD_POLICY_LISTEN",
    ]
    inet = load_config(env_with(CALLAHEAD_SOCKET="inet:127.0.0.1:8895"))
    assert postfix_socket_problems(inet, STRANGER) == []


# -- who else can reach a socket (callahead doctor's exposure item) ------------------


def _bound(path: Path, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    os.chmod(path, mode)
    return sock


@pytest.mark.parametrize(
    ("directory_mode", "socket_mode", "exposed", "words"),
    [
        (0o770, 0o777, False, "keeps every other local user out"),
        (0o755, 0o770, False, "lets no other local user connect"),
        (0o755, 0o777, True, "every local user can connect to"),
        (0o777, 0o770, True, "remove the socket and listen there"),
        (0o1777, 0o770, False, "lets no other local user connect"),
    ],
)
def test_local_exposure_matches_what_another_user_can_do(
    spool: Path, directory_mode: int, socket_mode: int, exposed: bool, words: str
) -> None:
    """The prediction, then the real thing: ``nobody`` (in none of the groups) connects
    to the socket, or puts a socket of its own in its place."""
    directory = spool / "callahead"
    directory.mkdir()
    os.chmod(directory, directory_mode)
    path = directory / "milter.sock"
    with _bound(path, socket_mode):
        found, why = local_exposure(str(path))
        assert (found, words in why) == (exposed, True), why
        if os.geteuid() != 0:
            return
        nobody = pwd.getpwnam("nobody")
        connected = as_user(nobody.pw_uid, nobody.pw_gid, path) == ALLOWED
        removed = as_user(nobody.pw_uid, nobody.pw_gid, path, "unlink") == ALLOWED
        if removed:  # and then listens there in callahead's place
            assert as_user(nobody.pw_uid, nobody.pw_gid, path, "bind") == ALLOWED
    assert (connected or removed) is exposed


def test_doctor_connects_as_the_postfix_user_without_running_an_interpreter(spool: Path) -> None:
    """As root, the connect is made by a forked child as that user: it works where the
    user could not run this interpreter (a virtualenv under /root), and what it gets
    (a refused connect) comes back."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to connect as another user")
    nobody = account("nobody")
    assert nobody is not None
    directory = spool / "callahead"
    directory.mkdir()
    os.chmod(directory, 0o755)
    path = directory / "milter.sock"
    with _bound(path, 0o777):
        assert unix_reach(str(path), nobody) is None
    dead = directory / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(dead))  # bound, never listening: a callahead that died
        os.chmod(dead, 0o777)
        problem = unix_reach(str(dead), nobody)
    assert problem == f"connect to {dead}: Connection refused"
