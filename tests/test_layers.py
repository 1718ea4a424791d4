"""The package's plan, checked from its imports: a folder per layer, and each layer
imports only the layers below it (docs/design.md has the picture).

    process     configuration, assembly, server, watchdog, command line
    frontends   milter, policy service, judge, admin socket, metrics
    core        the policy and the guard (no I/O)
    caching     local cache, snapshot file, shared cache, controls, refresh, catch-all
    probing     engine, failover, primaries, pool, breaker, budget, the loop
    smtp        one SMTP session, its evidence rules, the verdicts
    routing     route table, Postfix maps, MX resolution
    base        errors, log escaping, address syntax

A layer may keep one command's modules in a folder of its own (``process/doctor``); they
belong to that layer. A new import against the plan, a module outside the folders, or a module over
``MAX_LINES`` fails here (and so in CI).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "milter" / "callahead"
LAYERS = ("base", "routing", "smtp", "probing", "caching", "core", "frontends", "process")
"""Bottom first: a module may import its own layer and those before it."""
TOP_LEVEL = {"__init__", "__main__"}
"""Modules outside the folders: the version, and ``python -m callahead``."""
MAX_LINES = 400
OVER_THE_LIMIT: dict[str, int] = {}
"""Modules allowed over ``MAX_LINES`` for a while, each with its length then; none."""


def _layer_of(module: str) -> str | None:
    """``callahead.probing.engine`` -> ``probing``; None for the top level."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return None


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """Every callahead module ``path`` imports (relative imports resolved), with its
    line, TYPE_CHECKING imports included: they are the same dependency."""
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    own = _module_name(path).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("callahead")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("callahead"):
                continue
            if node.module is None or target.count(".") < 2:
                # ``from .. import cachefile``: the names are modules of that package.
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    name = _module_name(path)
    layer = _layer_of(name)
    out: list[str] = []
    for line, target in _imports(path, source):
        target_layer = _layer_of(target)
        where = f"{path.relative_to(PACKAGE)}:{line} imports {target}"
        if target_layer is None:
            if target not in ("callahead", "callahead.__version__"):
                out.append(f"{where}: not in a layer")
            continue
        if name == "callahead.__main__":
            if target_layer != "process":
                out.append(f"{where}: __main__ only starts the command line")
            continue
        if layer is None or LAYERS.index(target_layer) > LAYERS.index(layer):
            out.append(f"{where}: {layer} may not import {target_layer}")
    return out


def package_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer_folder() -> None:
    stray = []
    for path in package_modules():
        parts = path.relative_to(PACKAGE).parts
        top_level = len(parts) == 1 and path.stem in TOP_LEVEL
        # A layer may group one command's modules in a folder of its own (process/doctor).
        in_a_layer = len(parts) in (2, 3) and parts[0] in LAYERS
        if not (top_level or in_a_layer):
            stray.append("/".join(parts))
    assert stray == []
    for layer in LAYERS:
        init = PACKAGE / layer / "__init__.py"
        assert init.exists(), layer
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring and "May import" in docstring, f"{layer}: say what it may import"


def test_imports_run_down_the_layers() -> None:
    assert len(package_modules()) > 30, "the package was not found"
    found = [v for path in package_modules() for v in violations(path)]
    assert found == []


def test_no_module_is_over_the_limit() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in package_modules()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == OVER_THE_LIMIT


def test_the_check_sees_an_import_against_the_plan() -> None:
    engine = PACKAGE / "probing" / "engine.py"
    assert violations(engine, "from ..core.policy import Policy\n") == [
        "probing/engine.py:1 imports callahead.core.policy: probing may not import core"
    ]
    assert violations(engine, "from ..caching import cache\n") == [
        "probing/engine.py:1 imports callahead.caching.cache: probing may not import caching"
    ]
    assert violations(engine, "import callahead.process.config\n") != []
    assert violations(engine, "from .session import Session\n") == []
    assert violations(engine, "from ..routing.routes import Nexthop\n") == []
    guard = PACKAGE / "base" / "logfmt.py"
    assert violations(guard, "from ..frontends.metrics import Metrics\n") != []
