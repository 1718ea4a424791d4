"""Small pytest fixtures for the harness.

Use them from a test module with ``from tests.harness import fixtures`` and
``tmp_workdir = fixtures.tmp_workdir`` (or from a conftest.py, as ``tests/unit`` does
with ``scripted``).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests.harness.postfix import stop_instances_under
from tests.harness.scripted import Script, ScriptedServer


@contextlib.contextmanager
def make_workdir(prefix: str = "callahead-") -> Iterator[Path]:
    """A fresh 0755 directory under /tmp (Postfix's unprivileged processes must be able
    to traverse it, unlike pytest's 0700 ``tmp_path``). On exit, any Postfix instance
    still running in it is stopped, then it is removed."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        try:
            stop_instances_under(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmp_workdir() -> Iterator[Path]:
    """A fresh 0755 directory under /tmp, removed after the test (see make_workdir)."""
    with make_workdir() as path:
        yield path


class StartScripted(Protocol):
    """What the ``scripted`` fixture gives: start a ``ScriptedServer`` and return it."""

    def __call__(
        self, script: Script | None = None, *, port: int | None = None
    ) -> ScriptedServer: ...


@pytest.fixture
def scripted() -> Iterator[StartScripted]:
    """Starts scripted SMTP servers: ``scripted(Script(...))`` (``port=`` to take over
    the port of one stopped before). Every one is stopped after the test, even when the
    test fails (stopping twice is harmless)."""
    with contextlib.ExitStack() as servers:

        def start(script: Script | None = None, *, port: int | None = None) -> ScriptedServer:
            return servers.enter_context(ScriptedServer(script, port=port))

        yield start
