"""The front ends hand the backscatter meter's ledger what they accepted, with the queue
id once Postfix has one: the milter at a later RCPT or at DATA (the ``i`` macro), the
policy service at a later RCPT or a DATA / END-OF-MESSAGE request of the same
``instance``."""

from __future__ import annotations

import asyncio
from typing import Any

import Milter
import pytest
from Milter import testctx

from callahead.caching.cache import PositiveCache
from callahead.core.policy import Policy, TempfailAction
from callahead.frontends import adapter as adapter_module
from callahead.frontends.adapter import CallaheadMilter
from callahead.frontends.judge import Judge
from callahead.frontends.maillog.ledger import Ledger
from callahead.frontends.metrics import Metrics
from callahead.frontends.policyrequest import PolicyRequest
from callahead.frontends.policyservice import PolicyService
from tests.unit.frontends.test_adapter import ROUTES, UNKNOWN, VALID, FakeProber

ANSWERS = {"known@example.com": VALID, "gone@example.com": UNKNOWN}


def judge_with_ledger() -> tuple[Judge, Ledger]:
    metrics = Metrics()
    policy = Policy(
        routes=ROUTES,
        cache=PositiveCache(ttl=60, maxsize=100),
        prober=FakeProber(ANSWERS),
        tempfail_action=TempfailAction.ACCEPT,
    )
    ledger = Ledger(metrics.maillog)
    return Judge(policy, metrics, ledger), ledger


def test_the_milter_binds_at_data(monkeypatch: pytest.MonkeyPatch) -> None:
    judge, ledger = judge_with_ledger()
    connections = adapter_module.MilterConnections()
    monkeypatch.setattr(
        Milter,
        "factory",
        lambda: CallaheadMilter(judge, judge._metrics, connections),
    )
    ctx: Any = testctx.TestCtx()
    assert ctx._connect(host="c.example.net", helo="c.example.net", ip="192.0.2.7") == 0
    assert ctx._envfrom("<s@example.org>") == Milter.CONTINUE
    # Postfix's default smtpd_delay_open_until_valid_rcpt: no queue id at the first RCPT.
    assert ctx._envrcpt("<known@example.com>") == Milter.CONTINUE
    assert ctx._envrcpt("<gone@example.com>") == Milter.REJECT
    assert ctx._envrcpt("<someone@unrouted.example>") == Milter.CONTINUE
    assert len(ledger) == 0
    ctx._setsymval("i", "4DqG1x0Hk9z9vQ8")
    assert ctx._data() == Milter.ACCEPT
    assert ledger.reason_of("4DqG1x0Hk9z9vQ8", "known@example.com") == "probe_valid"
    assert len(ledger) == 1, "neither the rejected nor the unrouted recipient"
    # The next transaction: RSET before DATA holds nothing over.
    del ctx._macros["i"]
    assert ctx._envfrom("<s@example.org>") == Milter.CONTINUE
    assert ctx._envrcpt("<known@example.com>") == Milter.CONTINUE
    ctx._priv.abort()
    ctx._setsymval("i", "NEXT12345")
    ctx._data()
    assert len(ledger) == 1


def test_the_policy_service_binds_by_instance() -> None:
    judge, ledger = judge_with_ledger()
    service = PolicyService(judge, judge._metrics)

    def ask(**attributes: str) -> str:
        request = PolicyRequest({"request": "smtpd_access_policy", **attributes})
        return asyncio.run(service.answer(request))

    base = {"client_address": "192.0.2.7", "instance": "8f1.675473e1.a1b2c.0"}
    assert ask(protocol_state="RCPT", recipient="known@example.com", **base) == "DUNNO"
    assert len(ledger) == 0
    ask(protocol_state="DATA", queue_id="", **base)
    assert len(ledger) == 0
    ask(protocol_state="END-OF-MESSAGE", queue_id="4DqG1x0Hk9z9vQ8", **base)
    assert ledger.reason_of("4DqG1x0Hk9z9vQ8", "known@example.com") == "probe_valid"
