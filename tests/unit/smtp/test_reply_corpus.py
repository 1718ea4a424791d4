"""The corpus of real replies (replies.tsv) through the classifier, table-driven.

Each row is a reply a real mail system sends at RCPT TO, with its source (a repository,
commit and path: the system's own code or test suite, its documentation, or a bounce
classifier's corpus of real bounces; or the address of an issue thread or a vendor's
page that quotes the reply). Each is judged as a probe's RCPT reply on a
session that has already accepted a control address of the domain, the case where a
bare rejection can become a 550:

* a reply labelled ``prober`` (the prober, its address, HELO, sender or a policy is
  refused) or ``other`` must never be *unknown*: callahead would refuse real mail;
* a reply labelled ``unknown`` must be *unknown*, except the few in ``UNREADABLE``,
  which say why the classifier cannot read them (each is undecided: mail is accepted
  and queued, as without callahead).
"""

from __future__ import annotations

import asyncio
import collections
import re
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
import pytest

from callahead.smtp.classify import Classification, classify, enhanced_code
from callahead.smtp.evidence import EvidenceBook
from callahead.smtp.verdict import Stage, Verdict

CORPUS = Path(__file__).with_name("replies.tsv")
LABELS = ("unknown", "prober", "other")
SOURCE = re.compile(r"^(?:[\w.-]+/[\w.-]+@[0-9a-f]{7,40} \S+|https?://\S+)$")
"""``owner/repo@commit path`` (a file of a public repository), or the address of a public
page that quotes the reply (an issue thread, a vendor's documentation)."""


@dataclass(frozen=True, slots=True)
class Reply:
    line: int
    code: int
    enhanced: str
    text: str
    label: str
    system: str
    source: str


def _load() -> list[Reply]:
    rows: list[Reply] = []
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    body = [(n, line) for n, line in enumerate(lines, 1) if not line.startswith("#")]
    assert body[0][1].split("\t") == ["code", "enhanced", "text", "label", "system", "source"]
    for number, line in body[1:]:
        code, enhanced, text, label, system, source = line.split("\t")
        text = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], text)
        rows.append(Reply(number, int(code), enhanced, text, label, system, source))
    return rows


REPLIES = _load()

UNREADABLE = {
    "5.7.1 550 User Unknown: sabineko@example.org": "a 5.7.1 is policy, whatever its text",
    "5.7.1 <pseudo-local-part-kijitora-nyaan@sfr.fr>: Recipient address rejected: "
    "User unknown": "a 5.7.1 is policy (Postfix's access maps answer 5.7.1 too)",
    "5.2.1 <mikeneko@example.jp>... User Unknown": "5.2.1 says the mailbox exists but is "
    "disabled; sisimai files these replies as filtered, not unknown",
    "5.5.0 Adresse destinataire invalide. Invalid recipient. LPN007_416": "a 5.5.0 is a "
    "protocol error, and Orange uses 5.5.0 for blocked accounts and refusals too",
    "not our user": "a 551 is 'user not local' (RFC 5321), not 'no such user'",
    "'kijitora@nyaan.example.com' is not a registered gateway user": "no unknown-user "
    "phrase; this wording is one gateway's",
    "4.1.1 <recipient@RemoteDomain.com>: Recipient address rejected: unverified address: "
    'unknown user: "recipient@RemoteDomain.com"': "a 4xx is temporary: Postfix's "
    "unverified_recipient_reject_code is 450 by default, and no 4xx is ever final",
    "sorry, this recipient is not in my validrcptto list (#5.7.1)": "a 5.7.1 is policy, "
    "whatever its text (qmail's badrcptto answers 5.7.1 for users that exist)",
}
"""Recipient-unknown replies the classifier leaves undecided, and why."""


class _NoAsk:
    """The session's RCPT for controls: never needed, a control is already accepted."""

    async def __call__(self, path: bytes) -> tuple[Stage, aiosmtplib.SMTPResponse]:
        raise AssertionError(f"a control was asked: {path!r}")


async def _on_a_vouched_session(reply: Reply) -> Classification:
    """``reply`` as a probe's RCPT reply on a session that accepted a known user of the
    domain (session.py's path: classify, then the evidence rules for an unknown)."""
    found = classify(Stage.RCPT, reply.code, reply.text)
    if found.verdict is not Verdict.UNKNOWN:
        return found
    book = EvidenceBook(None, _NoAsk(), lambda: False, lambda line: None)
    book.accepted("known@example.test")
    return await book.judge_unknown("probe@example.test", found)


def _id(reply: Reply) -> str:
    return f"{reply.line}-{reply.label}-{reply.system}"


@pytest.mark.parametrize("reply", REPLIES, ids=_id)
def test_a_real_reply_is_read_as_its_label(reply: Reply) -> None:
    found = asyncio.run(_on_a_vouched_session(reply))
    assert found.verdict is not Verdict.VALID
    if reply.label != "unknown":
        assert found.verdict is Verdict.TEMPFAIL, f"{reply.code} {reply.text!r}: {found.why}"
    elif reply.text in UNREADABLE:
        assert found.verdict is Verdict.TEMPFAIL, "now read as unknown: drop it from UNREADABLE"
    else:
        assert found.verdict is Verdict.UNKNOWN, f"{reply.code} {reply.text!r}: {found.why}"


@pytest.mark.parametrize("reply", REPLIES, ids=_id)
def test_a_row_is_well_formed(reply: Reply) -> None:
    assert 200 <= reply.code <= 599
    assert reply.label in LABELS
    assert reply.system and SOURCE.match(reply.source), reply.source
    parsed = enhanced_code(reply.code, reply.text)
    assert (str(parsed) if parsed else "") == reply.enhanced


def test_the_corpus_covers_every_label_and_many_systems() -> None:
    labels = collections.Counter(reply.label for reply in REPLIES)
    systems = {reply.system.split(" (")[0] for reply in REPLIES} - {"unnamed"}
    assert len(REPLIES) >= 150
    assert min(labels[label] for label in LABELS) >= 25, labels
    assert len(systems) >= 30, sorted(systems)
    assert set(UNREADABLE) <= {reply.text for reply in REPLIES if reply.label == "unknown"}
    rows = {(reply.code, reply.text, reply.system) for reply in REPLIES}
    assert len(rows) == len(REPLIES), "a row is there twice"


VERDICTS_MD = Path(__file__).resolve().parents[3] / "docs" / "verdicts.md"
_TABLE_ROW = re.compile(r"^\| ([^|]+?) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|$", re.MULTILINE)


def test_the_summary_in_docs_verdicts_md_is_the_corpus() -> None:
    """docs/verdicts.md's corpus summary: its totals, and its rows per system and label."""
    text = VERDICTS_MD.read_text(encoding="utf-8")
    flat = " ".join(text.split())
    per_system: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for reply in REPLIES:
        per_system[reply.system.split(" (")[0]][reply.label] += 1
    named = len(per_system.keys() - {"unnamed"})
    assert f"`tests/unit/smtp/replies.tsv`: {len(REPLIES)} replies from {named} systems" in flat
    labels = collections.Counter(reply.label for reply in REPLIES)
    unknown, prober, other = (labels[label] for label in LABELS)
    assert f"unknown ({unknown}), prober ({prober}) or other ({other})" in flat
    table = {row[1]: tuple(int(n) for n in row.groups()[1:]) for row in _TABLE_ROW.finditer(text)}
    assert table == {
        name: (sum(count.values()), count["unknown"], count["prober"], count["other"])
        for name, count in per_system.items()
    }
