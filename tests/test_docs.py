"""The reference (docs/reference.md), the env example and the metrics table stay in step
with the code."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from callahead.frontends.metrics import Metrics
from callahead.process.cli import build_parser
from callahead.process.variables import VARIABLES

REPO = Path(__file__).resolve().parents[1]
REFERENCE = (REPO / "docs" / "reference.md").read_text()
ENV_EXAMPLE = (REPO / "deploy" / "callahead.env.example").read_text()


@pytest.mark.parametrize("name", [v.name for v in VARIABLES])
def test_every_variable_is_documented(name: str) -> None:
    assert f"| `{name}` |" in REFERENCE
    assert re.search(rf"^#?{name}=", ENV_EXAMPLE, re.MULTILINE), name


def test_every_metric_is_documented() -> None:
    exposition = generate_latest(Metrics().registry).decode()
    names = {m.group(1) for m in re.finditer(r"^# TYPE (\w+) (\w+)", exposition, re.MULTILINE)}
    assert names
    for name in names:
        assert f"`{name}" in REFERENCE, name


MAN_PAGE = (REPO / "debian" / "callahead.1").read_text()


def _synopsis() -> list[str]:
    """The man page's SYNOPSIS entries (split at ``.br``), fonts and ``\\-`` undone, one
    line each."""
    text = MAN_PAGE.split(".SH SYNOPSIS", 1)[1].split(".SH ", 1)[0]
    text = re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-")
    return [
        " ".join(re.sub(r"^\.\w+ ?", "", line) for line in entry.strip().splitlines())
        for entry in text.split(".br")
    ]


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[str, list[str]]]:
    """Every command of ``parser`` (``callahead cache show``), with its ``--`` options."""
    options = [
        o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"
    ]
    found = [(" ".join(("callahead", *path)), options)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(build_parser())


def _entries_of(command: str) -> list[str]:
    """The SYNOPSIS entries of ``command``: those it begins, unless a longer command
    (one under it, as ``callahead cache show`` under ``callahead cache``) does."""
    names = [c for c, _ in COMMANDS]

    def command_of(entry: str) -> str:
        return max((c for c in names if f"{entry} ".startswith(f"{c} ")), key=len, default="")

    return [e for e in _synopsis() if command_of(e) == command]


@pytest.mark.parametrize(("command", "options"), COMMANDS, ids=[c for c, _ in COMMANDS])
def test_every_command_and_option_is_in_the_man_page(command: str, options: list[str]) -> None:
    """Each command of the CLI has a SYNOPSIS entry naming every option it takes; a
    command with commands under it (``cache``) is covered by theirs."""
    entries = _entries_of(command)
    if not entries:
        assert any(c.startswith(f"{command} ") for c, _ in COMMANDS), command
        assert not options, (command, options)
        return
    named = {o for e in entries for o in re.findall(r"--[a-z][a-z-]*", e)}
    assert set(options) <= named, (command, entries)
