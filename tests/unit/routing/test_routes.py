"""Route parsing and lookup."""

from __future__ import annotations

import pytest

from callahead.base.address import normalize_domain
from callahead.routing.routes import (
    DEFAULT_SMTP_PORT,
    RECIPIENT_DOMAIN,
    Nexthop,
    RouteError,
    RouteTable,
    parse_nexthop,
    parse_routes,
)

A = Nexthop("a.mx.test", 25)
B = Nexthop("b.mx.test", 2525)


def test_lookup_is_case_insensitive() -> None:
    table = parse_routes("Example.COM=[mx.example.com]")
    hop = (Nexthop("mx.example.com", 25),)
    assert table.lookup("example.com") == hop
    assert table.lookup("EXAMPLE.COM") == hop
    assert table.lookup("eXaMpLe.CoM") == hop
    assert table.lookup("example.com.") == hop


def test_parent_entry_matches_subdomains_but_not_the_domain_itself() -> None:
    table = parse_routes(".example.com=[parent.mx.test]")
    hop = (Nexthop("parent.mx.test", 25),)
    assert table.lookup("a.example.com") == hop
    assert table.lookup("b.a.example.com") == hop
    assert table.lookup("A.EXAMPLE.COM") == hop
    assert table.lookup("example.com") == ()
    assert table.lookup("notexample.com") == ()
    assert table.lookup("a.example.com.evil.test") == ()


def test_exact_entry_beats_parent_entry() -> None:
    table = parse_routes(".example.com=[parent.mx.test] a.example.com=[exact.mx.test]")
    assert table.lookup("a.example.com") == (Nexthop("exact.mx.test", 25),)
    assert table.lookup("b.example.com") == (Nexthop("parent.mx.test", 25),)
    # The exact entry is for a.example.com only, not for its subdomains.
    assert table.lookup("x.a.example.com") == (Nexthop("parent.mx.test", 25),)


def test_closest_parent_wins() -> None:
    # Listed far parent last and first, so the order of entries cannot be what decides.
    for routes in (
        ".example.com=[far.mx.test] .a.example.com=[near.mx.test]",
        ".a.example.com=[near.mx.test] .example.com=[far.mx.test]",
    ):
        table = parse_routes(routes)
        assert table.lookup("x.a.example.com") == (Nexthop("near.mx.test", 25),)
        assert table.lookup("y.x.a.example.com") == (Nexthop("near.mx.test", 25),)
        assert table.lookup("x.b.example.com") == (Nexthop("far.mx.test", 25),)
        assert table.lookup("a.example.com") == (Nexthop("far.mx.test", 25),)


def test_match_names_the_entry_that_routes_a_domain() -> None:
    """The route key: what catch-all detection keeps its state by (bounded by the table,
    whatever domains senders make up)."""
    table = parse_routes(
        ".Example.com=[parent.mx.test] a.example.com=[exact.mx.test] .a.example.com=[near.mx.test]"
    )
    assert table.match("A.example.com") == ("a.example.com", (Nexthop("exact.mx.test", 25),))
    assert table.match("x.a.example.com") == (".a.example.com", (Nexthop("near.mx.test", 25),))
    assert table.match("b.example.com") == (".example.com", (Nexthop("parent.mx.test", 25),))
    assert table.match("example.com") == ("", ())
    assert table.match("") == ("", ())


def test_unrouted_domain_gives_empty_tuple() -> None:
    table = parse_routes("example.com=[mx.example.com]")
    assert table.lookup("example.org") == ()
    assert table.lookup("sub.example.com") == ()
    assert table.lookup("") == ()
    assert RouteTable().lookup("example.com") == ()
    assert not RouteTable()
    assert not parse_routes("")
    assert not parse_routes("  ,\n ")


def test_domain_listed_twice_keeps_both_nexthops_in_order() -> None:
    table = parse_routes("example.com=[a.mx.test] EXAMPLE.com=[b.mx.test]:2525")
    assert table.lookup("example.com") == (A, B)
    table = parse_routes("example.com=[b.mx.test]:2525 example.com=[a.mx.test]")
    assert table.lookup("example.com") == (B, A)
    assert len(table) == 1


def test_parent_domain_listed_twice_keeps_both_in_order() -> None:
    table = parse_routes(".example.com=[a.mx.test], .example.com=[b.mx.test]:2525")
    assert table.lookup("x.example.com") == (A, B)


@pytest.mark.parametrize(
    ("text", "hop"),
    [
        ("[mx.example.com]", Nexthop("mx.example.com", DEFAULT_SMTP_PORT)),
        ("[mx.example.com]:2525", Nexthop("mx.example.com", 2525)),
        ("mx.example.com:2525", Nexthop("mx.example.com", 2525, mx=True)),
        ("mx.example.com", Nexthop("mx.example.com", 25, mx=True)),
        ("MX.Example.COM.", Nexthop("mx.example.com", 25, mx=True)),
        ("smtp:", RECIPIENT_DOMAIN),
        ("relay:", RECIPIENT_DOMAIN),
        ("relay", RECIPIENT_DOMAIN),
        ("SMTP", RECIPIENT_DOMAIN),
        ("smtp:[mx.example.com]", Nexthop("mx.example.com", 25)),
        ("relay:[mx.example.com]:587", Nexthop("mx.example.com", 587)),
        ("SMTP:[mx.example.com]:26", Nexthop("mx.example.com", 26)),
        ("smtp:mx.example.com:26", Nexthop("mx.example.com", 26, mx=True)),
        ("[192.0.2.10]", Nexthop("192.0.2.10", 25)),
        ("192.0.2.10:2525", Nexthop("192.0.2.10", 2525)),
        ("[::1]:2525", Nexthop("::1", 2525)),
        ("[::1]", Nexthop("::1", 25)),
        ("[ipv6:2001:db8::1]:25", Nexthop("2001:db8::1", 25)),
        ("[mx.example.com]:65535", Nexthop("mx.example.com", 65535)),
        ("[mx.example.com]:1", Nexthop("mx.example.com", 1)),
    ],
)
def test_parse_nexthop(text: str, hop: Nexthop) -> None:
    assert parse_nexthop(text) == hop


def test_default_port_is_25() -> None:
    assert DEFAULT_SMTP_PORT == 25
    assert parse_routes("example.com=[mx]").lookup("example.com") == (Nexthop("mx", 25),)


def test_nexthop_str_is_bracketed() -> None:
    assert str(Nexthop("mx.example.com", 25)) == "[mx.example.com]:25"
    assert str(Nexthop("::1", 2525)) == "[::1]:2525"


def test_ipv6_route() -> None:
    table = parse_routes("example.com=[::1]:2525")
    assert table.lookup("example.com") == (Nexthop("::1", 2525),)
    assert table.entries() == [("example.com", Nexthop("::1", 2525))]


@pytest.mark.parametrize(
    "text",
    [
        "[mx.example.com",
        "[h]:0",
        "[h]:99999",
        "[h]x",
        "[h]:",
        "[h]:-1",
        "[]",
        "[]:25",
        ":25",
        "smtp::25",
        "[bad!host]",
        "2001:db8::1",
        "h:port",
    ],
)
def test_bad_nexthop(text: str) -> None:
    with pytest.raises(RouteError):
        parse_nexthop(text)


def test_separators_commas_and_whitespace_mixed() -> None:
    table = parse_routes(
        "  a.test=[a.mx.test],b.test=[b.mx.test]:2525 ,\n\tc.test=c.mx.test:26 ,, d.test=[d]  "
    )
    assert table.lookup("a.test") == (A,)
    assert table.lookup("b.test") == (B,)
    assert table.lookup("c.test") == (Nexthop("c.mx.test", 26, mx=True),)
    assert table.lookup("d.test") == (Nexthop("d", 25),)
    assert len(table) == 4


def test_entries_in_stable_order() -> None:
    table = parse_routes("b.test=[b] .p.test=[p] a.test=[a] b.test=[b2]")
    assert table.entries() == [
        ("b.test", Nexthop("b", 25)),
        ("b.test", Nexthop("b2", 25)),
        ("a.test", Nexthop("a", 25)),
        (".p.test", Nexthop("p", 25)),
    ]


@pytest.mark.parametrize(
    "text",
    ["example.com", "example.com=", "=[mx]", ".=[mx]", "bad domain!=[mx]", "example.com=m!x"],
)
def test_bad_routes(text: str) -> None:
    with pytest.raises(RouteError):
        parse_routes(text)


def test_route_with_two_leading_dots_is_refused() -> None:
    with pytest.raises(RouteError):
        parse_routes("..example.com=[mx]")


@pytest.mark.parametrize("route_domain", ["bücher.example", "xn--bcher-kva.example"])
@pytest.mark.parametrize(
    "recipient_domain", ["bücher.example", "BÜCHER.example", "xn--bcher-kva.example"]
)
def test_idn_route_matches_a_label_and_u_label(route_domain: str, recipient_domain: str) -> None:
    table = parse_routes(f"{route_domain}=[mx.idn.test]:25")
    assert table.lookup(recipient_domain) == (Nexthop("mx.idn.test", 25),)


def test_idn_parent_route_in_a_label_form() -> None:
    table = parse_routes(".xn--bcher-kva.example=[mx]")
    assert table.lookup("shop.xn--bcher-kva.example") == (Nexthop("mx", 25),)
    assert table.lookup("shop.bücher.example") == (Nexthop("mx", 25),)
    assert table.lookup("bücher.example") == ()


def test_idn_parent_route_in_u_label_form() -> None:
    table = parse_routes(".bücher.example=[mx]")
    assert table.lookup("shop.xn--bcher-kva.example") == (Nexthop("mx", 25),)
    assert table.lookup("shop.bücher.example") == (Nexthop("mx", 25),)


def test_normalize_domain() -> None:
    assert normalize_domain(" Example.COM. ") == "example.com"
    assert normalize_domain("Bücher.Example") == "xn--bcher-kva.example"
    assert normalize_domain("") == ""


def test_normalize_parent_domain_idn() -> None:
    assert normalize_domain(".Bücher.Example") == ".xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("domain", "a_label"),
    [
        # UTS #46 non-transitional, as Postfix (enable_idna2003_compatibility = no):
        # the sharp s and the final sigma are kept, not mapped to "ss" and sigma.
        ("straße.de", "xn--strae-oqa.de"),
        ("STRASSE.de", "strasse.de"),
        ("ςυμβολή.example", "xn--jxah1acqpv.example"),  # IDNA 2003: xn--jxah1acqvo
        ("faß.example", "xn--fa-hia.example"),
    ],
)
def test_idna_is_uts46_non_transitional(domain: str, a_label: str) -> None:
    assert normalize_domain(domain) == a_label


def test_two_domains_that_idna2003_would_merge_keep_their_routes() -> None:
    table = parse_routes("straße.de=[mx-sharp] strasse.de=[mx-ss]")
    assert table.lookup("straße.de") == (Nexthop("mx-sharp", 25),)
    assert table.lookup("xn--strae-oqa.de") == (Nexthop("mx-sharp", 25),)
    assert table.lookup("strasse.de") == (Nexthop("mx-ss", 25),)


def test_mx_nexthops_print_as_transport_5_writes_them() -> None:
    assert str(parse_nexthop("relay")) == "smtp:"
    assert str(parse_nexthop("smtp:mx.example.com")) == "mx.example.com:25"
    assert str(parse_nexthop("mx.example.com:2525")) == "mx.example.com:2525"
    table = parse_routes("a.test=smtp: b.test=mx.b.test")
    assert parse_routes(" ".join(f"{d}={h}" for d, h in table.entries())).entries() == (
        table.entries()
    )


def test_an_address_without_brackets_is_literal() -> None:
    """An address has no MX records: it is connected to, as with brackets."""
    assert parse_nexthop("192.0.2.10") == Nexthop("192.0.2.10", 25)
    assert parse_nexthop("smtp:192.0.2.10:2525") == Nexthop("192.0.2.10", 2525)
