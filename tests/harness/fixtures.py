"""Small pytest fixtures for the harness.

Use them from a test module with ``from tests.harness import fixtures`` and
``tmp_workdir = fixtures.tmp_workdir`` (or from a conftest.py).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.postfix import stop_instances_under


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
