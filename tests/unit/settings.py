"""Engine settings for tests: the configuration's own defaults (one table of them,
variables.VARIABLES), with what a test changes."""

from __future__ import annotations

import dataclasses
from typing import Any

from callahead.probing.engine import EngineSettings
from callahead.process.assembly import engine_settings
from callahead.process.config import load_config

HELO = "backup.example.net"


def probe_settings(**changes: Any) -> EngineSettings:
    """The default settings with the probe sender ``<>``, EHLO ``HELO``, a 5 s timeout,
    and ``changes``."""
    base = engine_settings(load_config({"CALLAHEAD_HELO_NAME": HELO}))
    values: dict[str, Any] = {"sender": "", "timeout": 5.0, **changes}
    return dataclasses.replace(base, **values)
