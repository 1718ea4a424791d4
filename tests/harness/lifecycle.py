"""What every server the harness starts has in common: ``with`` starts and stops it, and
its delivered mail is read from maildirs the same way."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType
from typing import Self


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
