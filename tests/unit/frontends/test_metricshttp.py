"""/metrics over HTTP (metricshttp.py), on real loopback sockets: a scrape gets the
exposition, and half-sent requests neither pile up nor lock a scraper out."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from callahead.frontends.metrics import Metrics
from callahead.frontends.metricshttp import MetricsServer
from tests.harness.waiting import wait_for

HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: backup-mx\r\n"
"""A request head without its empty line: a server waits for the rest."""


@pytest.fixture
def metrics() -> Metrics:
    metrics = Metrics()
    metrics.cache_hits.inc(7)
    return metrics


@pytest.fixture
def server(metrics: Metrics) -> Iterator[MetricsServer]:
    server = MetricsServer(metrics.registry, max_connections=4, timeout=0.5)
    server.start("127.0.0.1", 0)
    yield server
    server.stop()


def url(server: MetricsServer, path: str = "/metrics") -> str:
    return "http://{}:{}{}".format(*server.address, path)


def scrape(server: MetricsServer) -> tuple[str, str]:
    """The Content-Type and the body of one scrape."""
    with urllib.request.urlopen(url(server), timeout=5) as response:
        return response.headers["Content-Type"], response.read().decode()


def hits(body: str) -> float:
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == "callahead_cache_hits_total":
                return sample.value
    raise AssertionError("no callahead_cache_hits_total")


def closed_by_server(conn: socket.socket, within: float) -> bool:
    conn.settimeout(within)
    try:
        return conn.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_scrape_gets_the_exposition_with_its_content_type(server: MetricsServer) -> None:
    content_type, body = scrape(server)
    assert content_type == CONTENT_TYPE_LATEST
    assert hits(body) == 7
    # The server lets go of the connection once its answer is out, which the client
    # can see before the server's loop has run its last step: wait for it.
    wait_for(lambda: server.connections == 0, 5, what="the scrape's connection released")


def test_head_gets_the_headers_and_other_methods_405(server: MetricsServer) -> None:
    request = urllib.request.Request(url(server), method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) > 0
        assert response.read() == b""
    post = urllib.request.Request(url(server), data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=5)
    assert refused.value.code == 405


def test_half_sent_requests_are_bounded_cut_off_and_never_lock_a_scraper_out(
    server: MetricsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """prometheus-client's server kept a thread per half-sent request for as long as
    its sender liked (300 of them: 300 threads after 60 s)."""
    threads = threading.active_count()
    with caplog.at_level(logging.WARNING, logger="callahead.metrics"):
        flood = []
        for _ in range(50):
            conn = socket.create_connection(server.address, timeout=5)
            conn.sendall(HALF_SENT)
            flood.append(conn)
        try:
            wait_for(lambda: server.connections == 4, 5, what="the cap to fill")
            assert threading.active_count() == threads  # no thread per connection
            # A scraper sends its request at once: it takes the place of a half-sent one.
            assert hits(scrape(server)[1]) == 7
            assert server.connections <= 4
            # The ones over the cap were closed at once, the rest after the timeout.
            started = time.monotonic()
            assert all(closed_by_server(conn, 5) for conn in flood)
            assert time.monotonic() - started < 3
            wait_for(lambda: server.connections == 0, 5, what="no connection left")
        finally:
            for conn in flood:
                conn.close()
    lines = [r for r in caplog.records if r.name == "callahead.metrics"]
    assert len(lines) == 1  # counted, not one line per connection
    assert "at most 4 open" in lines[0].getMessage()


def test_a_request_head_over_the_limit_is_closed(server: MetricsServer) -> None:
    with socket.create_connection(server.address, timeout=5) as conn:
        conn.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n")
        assert closed_by_server(conn, 3)
    assert hits(scrape(server)[1]) == 7


def test_the_address_says_whether_other_hosts_reach_it(metrics: Metrics) -> None:
    loopback = MetricsServer(metrics.registry)
    loopback.start("127.0.0.1", 0)
    anywhere = MetricsServer(metrics.registry)
    anywhere.start("0.0.0.0", 0)
    try:
        assert not loopback.off_loopback
        assert anywhere.off_loopback
    finally:
        loopback.stop()
        anywhere.stop()


def test_a_port_in_use_is_an_os_error(server: MetricsServer, metrics: Metrics) -> None:
    with pytest.raises(OSError):
        MetricsServer(metrics.registry).start(*server.address)
