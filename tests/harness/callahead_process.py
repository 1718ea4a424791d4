"""Run ``callahead serve`` as a real process, the way an operator runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

from prometheus_client.parser import text_string_to_metric_families

from tests.harness.ports import free_port
from tests.harness.waiting import wait_for

STOP_TIMEOUT = 10.0
"""libmilter may take ~5 s to wind down after SIGTERM; after this, SIGKILL."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class CallaheadProcess:
    """``python -m callahead serve`` on fresh loopback ports, with its log in a file."""

    def __init__(self, workdir: Path, env: dict[str, str], *, name: str = "callahead") -> None:
        self.milter_port = free_port()
        self.metrics_port = free_port()
        self.log_path = workdir / f"{name}.log"
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CALLAHEAD_")},
            "CALLAHEAD_SOCKET": f"inet:127.0.0.1:{self.milter_port}",
            "CALLAHEAD_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "CALLAHEAD_HELO_NAME": "backup.test",
            "CALLAHEAD_LOG_LEVEL": "DEBUG",
            **env,
        }
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        """The value for Postfix's ``smtpd_milters``."""
        return f"inet:127.0.0.1:{self.milter_port}"

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "callahead", "serve"],
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(
                lambda: self._exited() or (_accepts(self.milter_port) and self._metrics_up()),
                timeout=20,
                what=f"callahead on port {self.milter_port}",
            )
        except TimeoutError:
            self.stop()
            raise
        if self._exited():
            raise RuntimeError(f"callahead exited at start:\n{self.log()}")

    def _exited(self) -> bool:
        return self._proc is not None and self._proc.poll() is not None

    def _metrics_up(self) -> bool:
        try:
            self.scrape()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body: bytes = response.read()
        return body.decode()

    def samples(self) -> Samples:
        """Every sample of ``/metrics``, parsed by prometheus-client's own parser."""
        out: Samples = {}
        for family in text_string_to_metric_families(self.scrape()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
