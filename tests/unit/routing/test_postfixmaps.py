"""Routes from a Postfix configuration (postfixmaps.py), through the real postconf and
postmap on real map files in a temp dir: Postfix's lookup order, relay_domains matching,
which transports are routes, and failures that are undecided."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from callahead.routing.postfixmaps import PostfixRoutes, parent_keys
from callahead.routing.postfixsettings import PostfixConfigError, load_settings, split_list
from callahead.routing.routes import RECIPIENT_DOMAIN, Nexthop, RouteUnavailable

pytestmark = pytest.mark.skipif(
    shutil.which("postmap") is None and not Path("/usr/sbin/postmap").exists(),
    reason="needs Postfix's postmap and postconf (apt-get install postfix)",
)

MASTER_CF = """\
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
primary   unix  -       -       n       -       -       smtp
lmtp      unix  -       -       n       -       -       lmtp
error     unix  -       -       n       -       -       error
"""


def postfix_dir(tmp_path: Path, main: dict[str, str], files: dict[str, str]) -> str:
    """A Postfix config dir: main.cf from ``main`` ($DIR is the dir), master.cf, and
    ``files`` (``*.hash`` sources are compiled with postmap as hash: maps)."""
    etc = tmp_path / "etc"
    etc.mkdir()
    for name, text in files.items():
        (etc / name).write_text(text)
        if name.endswith(".hash"):
            postmap = shutil.which("postmap") or "/usr/sbin/postmap"
            (etc / "main.cf").write_text("compatibility_level = 3.6\n")
            cool(etc)
            subprocess.run([postmap, "-c", str(etc), f"hash:{etc / name}"], check=True)
    lines = ["compatibility_level = 3.6", *(f"{k} = {v}" for k, v in main.items())]
    (etc / "main.cf").write_text("\n".join(lines).replace("$DIR", str(etc)) + "\n")
    (etc / "master.cf").write_text(MASTER_CF)
    cool(etc)
    return str(etc)


def cool(directory: Path) -> None:
    """Backdate every file: Postfix's tools wait about a second for a just-written
    main.cf or map to settle."""
    old = time.time() - 60
    for path in directory.iterdir():
        os.utime(path, (old, old))


def routes_of(config_dir: str) -> PostfixRoutes:
    return PostfixRoutes(load_settings(config_dir))


def lookup(routes: PostfixRoutes, domain: str, address: str = "") -> tuple[Nexthop, ...]:
    return asyncio.run(routes.lookup(domain, address or f"someone@{domain}"))


TRANSPORT = """\
exact.test        smtp:[192.0.2.1]:2525
.parent.test      relay:[192.0.2.2]
mx.test           relay
list.test         smtp:[192.0.2.3], [192.0.2.4]:26
gone.test         error:5.1.2 gone
lmtp.test         lmtp:[192.0.2.5]
own.test          primary:[192.0.2.6]
default.test      :
nexthop-only.test :[192.0.2.7]
"""


@pytest.fixture
def standard(tmp_path: Path) -> PostfixRoutes:
    config_dir = postfix_dir(
        tmp_path,
        {
            "relay_domains": "exact.test, parent.test, mx.test list.test gone.test lmtp.test "
            "own.test default.test nexthop-only.test hash:$DIR/relay.hash, rx.test, "
            "!no.star.test, star.test",
            "transport_maps": "regexp:$DIR/transport.re, hash:$DIR/transport.hash",
            "parent_domain_matches_subdomains": "relay_domains",
        },
        {
            "transport.hash": TRANSPORT,
            "transport.re": "/^special@rx\\.test$/ smtp:[192.0.2.9]:2626\n",
            "relay.hash": "from-map.test OK\n",
        },
    )
    return routes_of(config_dir)


def test_exact_domain_entry(standard: PostfixRoutes) -> None:
    assert lookup(standard, "exact.test") == (Nexthop("192.0.2.1", 2525),)


def test_parent_entry_matches_subdomains_only(standard: PostfixRoutes) -> None:
    assert lookup(standard, "a.b.parent.test") == (Nexthop("192.0.2.2", 25),)
    # parent.test itself is relayed, but .parent.test in the table is for subdomains.
    assert lookup(standard, "parent.test") == (RECIPIENT_DOMAIN,)


def test_a_transport_with_no_nexthop_is_the_recipient_domain(standard: PostfixRoutes) -> None:
    assert lookup(standard, "mx.test") == (RECIPIENT_DOMAIN,)


def test_a_nexthop_list_is_tried_in_order(standard: PostfixRoutes) -> None:
    assert lookup(standard, "list.test") == (Nexthop("192.0.2.3", 25), Nexthop("192.0.2.4", 26))


def test_only_smtp_services_are_routes(standard: PostfixRoutes) -> None:
    assert lookup(standard, "gone.test") == ()
    assert lookup(standard, "lmtp.test") == ()
    assert lookup(standard, "own.test") == (Nexthop("192.0.2.6", 25),)


def test_no_entry_or_a_null_entry_goes_to_the_recipient_domain(standard: PostfixRoutes) -> None:
    assert lookup(standard, "default.test") == (RECIPIENT_DOMAIN,)
    assert lookup(standard, "from-map.test") == (RECIPIENT_DOMAIN,)
    assert lookup(standard, "nexthop-only.test") == (Nexthop("192.0.2.7", 25),)


def test_regexp_tables_are_searched_with_the_whole_address_first(standard: PostfixRoutes) -> None:
    assert lookup(standard, "rx.test", "special@rx.test") == (Nexthop("192.0.2.9", 2626),)
    assert lookup(standard, "rx.test", "other@rx.test") == (RECIPIENT_DOMAIN,)


def test_relay_domains_matching(standard: PostfixRoutes) -> None:
    assert lookup(standard, "unrelated.test") == ()
    # A listed name matches its subdomains (relay_domains in parent_domain_matches_...).
    assert lookup(standard, "sub.star.test") == (RECIPIENT_DOMAIN,)
    # ...but the first matching pattern decides, and !no.star.test comes first.
    assert lookup(standard, "no.star.test") == ()


def test_parent_style_follows_parent_domain_matches_subdomains(tmp_path: Path) -> None:
    transport = "example.test smtp:[192.0.2.1]\n.example.test smtp:[192.0.2.2]\n"
    for listed, sub_hop in (("", "192.0.2.2"), ("transport_maps", "192.0.2.1")):
        case = tmp_path / (listed or "none")
        case.mkdir()
        routes = routes_of(
            postfix_dir(
                case,
                {
                    "relay_domains": "example.test",
                    "transport_maps": "hash:$DIR/t.hash",
                    "parent_domain_matches_subdomains": f"relay_domains {listed}",
                },
                {"t.hash": transport},
            )
        )
        assert lookup(routes, "a.example.test") == (Nexthop(sub_hop, 25),)


@pytest.mark.parametrize(
    ("listed", "pattern", "matched"),
    [
        ("relay_domains", "example.test", ["example.test", "a.example.test"]),
        ("relay_domains", ".example.test", []),
        ("", "example.test", ["example.test"]),
        ("", ".example.test", ["a.example.test"]),
    ],
)
def test_relay_domains_names_match_as_in_postfix(
    tmp_path: Path, listed: str, pattern: str, matched: list[str]
) -> None:
    routes = routes_of(
        postfix_dir(
            tmp_path,
            {"relay_domains": pattern, "parent_domain_matches_subdomains": listed},
            {},
        )
    )
    for domain in ("example.test", "a.example.test"):
        assert bool(lookup(routes, domain)) is (domain in matched), domain


def test_wildcard_entry_comes_last(tmp_path: Path) -> None:
    routes = routes_of(
        postfix_dir(
            tmp_path,
            {
                "relay_domains": "a.test b.test",
                "transport_maps": "inline:{a.test=smtp:[192.0.2.1], *=smtp:[192.0.2.9]}",
            },
            {},
        )
    )
    assert lookup(routes, "a.test") == (Nexthop("192.0.2.1", 25),)
    assert lookup(routes, "b.test") == (Nexthop("192.0.2.9", 25),)


def test_relayhost_is_the_default_nexthop(tmp_path: Path) -> None:
    routes = routes_of(
        postfix_dir(tmp_path, {"relay_domains": "a.test", "relayhost": "[192.0.2.50]:587"}, {})
    )
    assert lookup(routes, "a.test") == (Nexthop("192.0.2.50", 587),)


def test_results_are_cached_per_domain(standard: PostfixRoutes) -> None:
    assert standard.cached("exact.test", "") is None
    lookup(standard, "exact.test", "x@exact.test")
    # With a regexp table every address is its own lookup; without an address, the domain.
    assert standard.cached("exact.test", "y@exact.test") is None
    assert standard.cached("exact.test", "") == (Nexthop("192.0.2.1", 2525),)


def test_a_map_that_cannot_be_opened_stops_loading(tmp_path: Path) -> None:
    config_dir = postfix_dir(
        tmp_path, {"relay_domains": "a.test", "transport_maps": "hash:$DIR/missing"}, {}
    )
    with pytest.raises(PostfixConfigError, match="missing"):
        load_settings(config_dir)


def test_a_map_that_fails_later_is_route_unavailable(tmp_path: Path) -> None:
    config_dir = postfix_dir(
        tmp_path,
        {"relay_domains": "a.test", "transport_maps": "hash:$DIR/t.hash"},
        {"t.hash": TRANSPORT},
    )
    routes = routes_of(config_dir)
    Path(config_dir, "t.hash.db").unlink()
    with pytest.raises(RouteUnavailable, match=r"t\.hash"):
        lookup(routes, "a.test")


def test_no_main_cf_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(PostfixConfigError, match=r"main\.cf"):
        load_settings(str(tmp_path))


def test_split_list_keeps_inline_tables_whole() -> None:
    assert split_list("a, b  inline:{x=1, y=2},c") == ["a", "b", "inline:{x=1, y=2}", "c"]


def test_parent_keys() -> None:
    assert parent_keys("a.b.test", parent_matches=False) == ["a.b.test", ".b.test", ".test"]
    assert parent_keys("a.b.test", parent_matches=True) == ["a.b.test", "b.test", "test"]
