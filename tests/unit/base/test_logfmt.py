"""Log fields no sender can forge (logfmt.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from callahead.base.logfmt import escape, redact_url

FIELD = re.compile(r'(\w+)=(<[^<>\s]*>|"[^"]*"|\S+)')


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("bob@example.com", "bob@example.com"),
        ("jörg@example.com", "jörg@example.com"),
        (
            '"x> decision=accept reason=cache_hit <"@example.com',
            r"\x22x\x3e\x20decision\x3daccept\x20reason\x3dcache_hit\x20\x3c\x22@example.com",
        ),
        ("a\tb\nc\r\x00", r"a\x09b\x0ac\x0d\x00"),
        ("back\\slash", r"back\x5cslash"),
        ("line\u2028sep", r"line\u2028sep"),
    ],
)
def test_escape(text: str, escaped: str) -> None:
    assert escape(text) == escaped


def test_spaces_kept_inside_quotes_but_no_key_value() -> None:
    assert escape('5.1.1 <a=b>: "User" unknown', spaces=True) == (
        r"5.1.1 \x3ca\x3db\x3e: \x22User\x22 unknown"
    )


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_an_escaped_field_is_one_field(text: str) -> None:
    line = f"Q1: client=192.0.2.1 rcpt=<{escape(text)}> decision=reject reason=probe_unknown"
    assert [key for key, _ in FIELD.findall(line)] == ["client", "rcpt", "decision", "reason"]
    assert "\n" not in line and "\r" not in line
    quoted = f'reply="{escape(text, spaces=True)}" decision=reject'
    assert [key for key, _ in FIELD.findall(quoted)] == ["reply", "decision"]


@settings(max_examples=200, deadline=None)
@given(
    password=st.text(alphabet="abcdefghijkXYZ0123456789-_.~!$", min_size=6, max_size=20),
    where=st.sampled_from(
        [
            "redis://:{p}@h.example:6379/0",
            "redis://cache:{p}@h.example/0",
            "redis://h.example/0?password={p}",
            "redis://h.example/0?db=2&Password={p}&username=cache",
            "rediss://h.example/0?auth_token={p}",
            "unix:///run/redis.sock?password={p}",
            ":{p}@h.example:6379",
        ]
    ),
)
def test_redact_url_removes_the_password_wherever_redis_py_takes_it(
    password: str, where: str
) -> None:
    shown = redact_url(where.format(p=password))
    assert password not in shown
    assert "***" in shown
