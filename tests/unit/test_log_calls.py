"""Every log call of the package escapes what a sender or a primary controls.

A recipient, a domain, a reply of the primary, a sender or a classification (which
quotes the reply) can carry spaces, ``=``, quotes and line breaks: written raw, a
crafted local part such as ``"x decision=reject rcpt=<victim@example.com>"@nx.example``
forges fields for a log parser (fail2ban). This reads the package's source: any
argument of a ``log.<level>(...)`` call that names such a value must be wrapped in
``escape(...)`` (or be a decision line, which escapes its own fields)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "milter" / "callahead"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
TAINTED = (
    "address",
    "recipient",
    "rcpt",
    "domain",
    "detail",
    "reply",
    "message",
    "why",
    "sender",
    "label",
    "text",
)
"""Names whose values come from a sender or a primary."""
SAFE_CALLS = {"escape", "decision_line", "redact_url", "len", "_ies", "int", "float"}


def _log_calls(tree: ast.AST) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in LEVELS
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in ("log", "logger")
    ]


def _raw_names(node: ast.expr) -> list[str]:
    """Tainted names used in ``node`` outside a safe call."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name | ast.Attribute):
        name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
        if name in SAFE_CALLS:
            return []
    found: list[str] = []
    if isinstance(node, ast.Name | ast.Attribute):
        name = node.id if isinstance(node, ast.Name) else node.attr
        if not name.isupper() and any(word in name.lower() for word in TAINTED):
            found.append(ast.unparse(node))
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.keyword):
            child = child.value
        if isinstance(child, ast.expr):
            found += _raw_names(child)
    return found


def _findings() -> list[str]:
    out = []
    paths = sorted(PACKAGE.rglob("*.py"))
    assert len(paths) > 30, "the package was not found"
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        for call in _log_calls(tree):
            for arg in call.args[1:]:
                for name in _raw_names(arg):
                    out.append(f"{path.relative_to(PACKAGE)}:{call.lineno}: {name}")
    return out


def test_no_log_call_writes_a_sender_or_primary_controlled_value_raw() -> None:
    assert _findings() == []


def test_the_check_sees_a_raw_address() -> None:
    tree = ast.parse('log.info("no host to probe for %s: %s", address, exc)')
    assert [n for c in _log_calls(tree) for a in c.args[1:] for n in _raw_names(a)] == ["address"]
    tree = ast.parse('log.info("%s", ADVICE.format(domain=domain))')
    assert [n for c in _log_calls(tree) for a in c.args[1:] for n in _raw_names(a)] == ["domain"]
    tree = ast.parse('log.info("for %s", escape(result.detail, spaces=True))')
    assert [n for c in _log_calls(tree) for a in c.args[1:] for n in _raw_names(a)] == []


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_every_level_is_checked(level: str) -> None:
    tree = ast.parse(f"log.{level}('%s', result.why)")
    assert len(_log_calls(tree)) == 1
