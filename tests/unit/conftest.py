"""Fixtures of the unit tests: ``scripted`` starts scripted SMTP primaries on loopback
(``tests.harness.scripted``) and stops them after the test; ``probe_loop`` is a running
probe loop, stopped after the test."""

from collections.abc import Iterator

import pytest

from callahead.probing.loop import ProbeLoop
from tests.harness.fixtures import scripted

__all__ = ["probe_loop", "scripted"]


@pytest.fixture
def probe_loop() -> Iterator[ProbeLoop]:
    loop = ProbeLoop()
    loop.start()
    yield loop
    loop.stop()
