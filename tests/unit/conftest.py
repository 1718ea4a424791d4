"""Fixtures of the unit tests: ``scripted`` starts scripted SMTP primaries on loopback
(``tests.harness.scripted``) and stops them after the test."""

from tests.harness.fixtures import scripted

__all__ = ["scripted"]
