"""What every server the harness starts has in common: ``with`` starts and stops it, one
still running when the interpreter exits is stopped then (``stop_at_exit``), and its
delivered mail is read from maildirs the same way."""

from __future__ import annotations

import atexit
import contextlib
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

T = TypeVar("T", bound="StartStop")


class StartStop:
    """``with thing:`` starts it and stops it again, even when the block fails."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# Strong references: a server dropped while running is still stopped at exit, so that no
# thread, port or process outlives a test run that was torn down abnormally.
_running: set[StartStop] = set()


@atexit.register
def _stop_all() -> None:
    for thing in list(_running):
        with contextlib.suppress(Exception):
            thing.stop()


def stop_at_exit(thing: StartStop) -> None:
    """Have ``thing`` (being started) stopped at interpreter exit, unless it is
    ``forget_at_exit`` before."""
    _running.add(thing)


def forget_at_exit(thing: StartStop) -> None:
    """``thing`` has stopped: nothing to do for it at exit."""
    _running.discard(thing)


def still_running(kind: type[T]) -> list[T]:
    """The ``kind`` things started and not stopped yet."""
    return [thing for thing in list(_running) if isinstance(thing, kind)]


def _maildir_files(maildir: Path) -> list[Path]:
    files: list[Path] = []
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            files.extend(p for p in (maildir / sub).iterdir() if p.is_file())
    return files


def maildir_messages(maildir: Path) -> list[bytes]:
    """The messages in ``maildir`` (new and cur), oldest first; none if it is missing."""
    files = _maildir_files(maildir)
    files.sort(key=lambda p: (p.stat().st_mtime, p.name))
    return [p.read_bytes() for p in files]


def maildir_count(maildir: Path) -> int:
    """How many messages ``maildir`` holds (0 if it is missing)."""
    return len(_maildir_files(maildir))
