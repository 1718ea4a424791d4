"""A real Postfix primary whose postmaster@ is a ``virtual_alias_maps`` alias while its
mailbox map breaks (every user refused with 5.1.1): the alias still answers 250, the
recently verified controls are refused, and that is drift, not a reason for a 550
(issue 27, item 4; docs/verdicts.md, "drift")."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from callahead.caching.cache import PositiveCache
from callahead.routing.routes import Nexthop
from callahead.smtp.verdict import Basis, Verdict
from tests.harness.ports import free_port
from tests.harness.postfix import Listener, PostfixInstance, primary_main_cf
from tests.unit.probing.test_engine import engine_with, settings

DOMAIN = "alias.test"
USERS = [f"u{n}@{DOMAIN}" for n in (1, 2, 3)]


@pytest.fixture
def aliased_primary(workdir: Path) -> Iterator[tuple[PostfixInstance, Nexthop]]:
    """A Postfix primary of ``DOMAIN`` knowing ``USERS``, whose postmaster@ is an alias
    (``virtual_alias_maps``), as most hand-made Postfix sites have it."""
    main_cf = primary_main_cf(workdir=workdir, users=USERS, map_type="hash")
    main_cf["virtual_alias_maps"] = f"inline:{{postmaster@{DOMAIN}=u1@{DOMAIN}}}"
    port = free_port()
    instance = PostfixInstance(workdir, main_cf, [Listener(port)])
    instance.start()
    try:
        yield instance, Nexthop("127.0.0.1", port)
    finally:
        instance.stop()


def test_an_aliased_postmaster_never_overrules_refused_controls(
    aliased_primary: tuple[PostfixInstance, Nexthop],
) -> None:
    primary, hop = aliased_primary
    known_valid = PositiveCache(ttl=3600, maxsize=100)

    async def before() -> None:
        async with engine_with(settings(), known_valid=known_valid) as engine:
            for address in USERS[:2]:
                assert (await engine.probe(address, [hop])).verdict is Verdict.VALID

    async def after() -> list[tuple[Verdict, Basis, int | None]]:
        async with engine_with(settings(), known_valid=known_valid) as engine:
            alias = await engine.probe(f"postmaster@{DOMAIN}", [hop])
            assert alias.verdict is Verdict.VALID, alias  # the alias outlives the map
        async with engine_with(settings(), known_valid=known_valid) as engine:
            results = [await engine.probe(a, [hop]) for a in (USERS[2], f"nobody@{DOMAIN}")]
            return [(r.verdict, r.basis, r.code) for r in results]

    asyncio.run(before())
    primary.set_virtual_users([])  # the mailbox map broke: everyone gets 5.1.1
    results = asyncio.run(after())
    # u3 is a real user: never a 550. Drift, as for the unknown one.
    assert results == [(Verdict.TEMPFAIL, Basis.DRIFT, 550)] * 2, results
    assert set(known_valid.recent(DOMAIN)) >= set(USERS[:2])  # no control marked stale
