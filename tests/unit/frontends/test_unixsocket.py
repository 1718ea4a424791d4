"""The careful unix socket helper the admin socket and the policy service share: a stale
socket is replaced, a live one and anything that is not a socket are never touched, and
at stop the path goes only if it is still the inode this process bound."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from callahead.frontends.unixsocket import UnixSocketError, bind_unix, clear_stale


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on: what a callahead that died leaves."""
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale_socket(path)
    bound = bind_unix(str(path))
    try:
        assert os.lstat(path).st_ino == bound.inode
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # listening
    finally:
        bound.sock.close()
        assert bound.remove()
    assert not path.exists()


def test_a_live_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    live = bind_unix(str(path))
    try:
        with pytest.raises(UnixSocketError, match="another process answers"):
            bind_unix(str(path))
        assert os.lstat(path).st_ino == live.inode
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # still the first one's
    finally:
        live.sock.close()
        live.remove()


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_what_is_not_a_socket_is_never_touched(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "s.sock"
    target = tmp_path / "precious"
    target.write_text("precious")
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(target)
    with pytest.raises(UnixSocketError, match="is not a socket"):
        bind_unix(str(path))
    with pytest.raises(UnixSocketError, match="is not a socket"):
        clear_stale(str(path))
    assert path.is_dir() if kind == "directory" else path.read_text() == "precious"
    assert target.read_text() == "precious"


def test_nothing_there_is_nothing_to_clear(tmp_path: Path) -> None:
    clear_stale(str(tmp_path / "none.sock"))
    with pytest.raises(UnixSocketError, match="cannot listen"):
        bind_unix(str(tmp_path / "no-such-dir" / "s.sock"))


def test_at_stop_only_the_inode_this_process_bound_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = bind_unix(str(path))
    first.sock.close()  # this instance hangs; a second one finds the socket stale
    second = bind_unix(str(path))
    try:
        assert not first.remove()  # the first one stops later: the path is not its own
        assert os.lstat(path).st_ino == second.inode
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
    finally:
        second.sock.close()
        assert second.remove()
    assert not path.exists()


def test_at_stop_a_file_put_in_its_place_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    bound = bind_unix(str(path))
    bound.sock.close()
    os.unlink(path)
    path.write_text("precious")
    assert not bound.remove()
    assert path.read_text() == "precious"


def test_the_mode_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    bound = bind_unix(str(path), 0o660)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o660
    finally:
        bound.sock.close()
        bound.remove()
