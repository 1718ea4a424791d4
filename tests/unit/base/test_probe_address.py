"""The address that goes on the wire (classification: test_verdict.py)."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from callahead.base.address import MAX_ADDRESS_OCTETS, UnsendableAddress, wire_address

# --- wire_address ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "user@example.com",
        "first.last+tag@sub.example.com",
        "UPPER@EXAMPLE.COM",
        "a@b",
        "user@[192.0.2.1]",
        "user@xn--bcher-kva.example",
        '"john doe"@example.test',
        '"a<b>c"@example.test',
        '"x"@example.test',
        "!#$%&'*+-/=?^_`{|}~@example.test",
        "x" * 64 + "@example.test",
        "x" * 65 + "@example.test",  # over RFC 5321's 64, which servers must not enforce
        "x" * 300 + "@example.test",
    ],
)
def test_wire_address_accepts(address: str) -> None:
    assert wire_address(address) == address.encode("ascii")


def test_wire_address_longest_address_accepted() -> None:
    local = "l" * 64
    domain = "d" * (MAX_ADDRESS_OCTETS - len(local) - 1)
    address = f"{local}@{domain}"
    assert len(b"RCPT TO:<" + address.encode() + b">\r\n") == 512
    assert wire_address(address) == address.encode()


@pytest.mark.parametrize(
    "address",
    [
        "",
        "user@example.com\r\nRSET",
        "user@example.com\r",
        "user@example.com\n",
        "us\ner@example.com",
        "user\x00@example.com",
        "user@exa\x00mple.com",
        "user\t@example.com",
        "user\x7f@example.com",
        "us<er@example.com",
        "us>er@example.com",
        "user@example.com>",
        "user@exam<ple.com",
        "us er@example.com",
        "user@exa mple.com",
        '"user@example.com',
        'us"er@example.com',
        "jörg@example.com",
        "user@bücher.example",
        "user\u2028@example.com",
        "x" * MAX_ADDRESS_OCTETS + "@example.test",
        "no-at-sign",
        "@example.com",
        "user@",
    ],
)
def test_wire_address_refuses(address: str) -> None:
    with pytest.raises(UnsendableAddress):
        wire_address(address)


def test_wire_address_refuses_what_does_not_fit_one_command_line() -> None:
    local = "l" * 64
    domain = "d" * (MAX_ADDRESS_OCTETS - len(local))  # one octet too many
    address = f"{local}@{domain}"
    assert len(b"RCPT TO:<" + address.encode() + b">\r\n") == 513
    with pytest.raises(UnsendableAddress):
        wire_address(address)


def _brackets_outside_quotes(text: str) -> bool:
    """Whether ``text`` holds ``<`` or ``>`` outside an RFC 5321 quoted string."""
    quoted = False
    escaped = False
    for c in text:
        if quoted:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "<>":
            return True
    return False


_SMTP_ISH = st.text(alphabet=st.sampled_from(list('ab.@"<> \\\r\n\x00\té')), max_size=30)
_ADDRESSES = st.one_of(st.text(max_size=300), _SMTP_ISH)


@settings(max_examples=200, deadline=None)
@given(_ADDRESSES)
def test_wire_address_never_emits_line_breaks_or_nul(address: str) -> None:
    try:
        raw = wire_address(address)
    except UnsendableAddress:
        return
    assert isinstance(raw, bytes)
    assert raw == address.encode("ascii")
    assert b"\r" not in raw
    assert b"\n" not in raw
    assert b"\x00" not in raw
    assert len(raw) <= MAX_ADDRESS_OCTETS


@settings(max_examples=200, deadline=None)
@given(_ADDRESSES)
@example('"a">"@example.com')
def test_wire_address_never_emits_brackets_outside_quotes(address: str) -> None:
    try:
        raw = wire_address(address)
    except UnsendableAddress:
        return
    text = raw.decode("ascii")
    assert not any(c in text for c in "\r\n\x00")
    assert not _brackets_outside_quotes(text), text


@pytest.mark.parametrize("address", ['"a">"@example.com', '"a"<"@example.com', '"a" "b"@x.test'])
def test_wire_address_refuses_bracket_after_closing_quote(address: str) -> None:
    with pytest.raises(UnsendableAddress):
        wire_address(address)


# --- properties --------------------------------------------------------------------------


_UTF8_ISH = st.text(
    alphabet=st.one_of(
        st.sampled_from(list('ab.@"<> \\\r\n\x00\té\u2028\x85')),
        # Every encodable character, and lone surrogates (not UTF-8 at all). The
        # category names of hypothesis < 6.84 (Debian 12 has 6.67), which the newer
        # ones still take.
        st.characters(blacklist_categories=["Cs"]),
        st.characters(whitelist_categories=["Cs"]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), _UTF8_ISH, _SMTP_ISH))
@example("jörg@example.test")
@example("j\udcf6rg@example.test")
@example('"jörg müller"@example.test')
@example("ö" * 33 + "@example.test")  # 66 octets: over RFC 5321's local-part limit
def test_wire_address_utf8_never_emits_line_breaks_or_nul_and_round_trips(address: str) -> None:
    try:
        raw = wire_address(address, allow_utf8=True)
    except UnsendableAddress:
        return
    assert b"\r" not in raw
    assert b"\n" not in raw
    assert b"\x00" not in raw
    assert raw.decode("utf-8") == address
    assert len(raw) <= MAX_ADDRESS_OCTETS
    assert not _brackets_outside_quotes(address)


def test_wire_address_utf8_accepts_non_ascii_local_part_only_when_allowed() -> None:
    assert wire_address("jörg@example.test", allow_utf8=True) == "jörg@example.test".encode()
    with pytest.raises(UnsendableAddress):
        wire_address("jörg@example.test")
    with pytest.raises(UnsendableAddress):
        wire_address("jörg@bücher.example", allow_utf8=True)  # the domain goes as A-label
