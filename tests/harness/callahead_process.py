"""Run ``callahead serve`` as a real process, the way an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.harness.ports import accepts, free_port
from tests.harness.process import ManagedProcess

STOP_TIMEOUT = 10.0
"""libmilter may take ~5 s to wind down after SIGTERM; after this, SIGKILL."""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class CallaheadProcess(ManagedProcess):
    """``python -m callahead serve`` on fresh loopback ports, with its log in a file."""

    def __init__(self, workdir: Path, env: dict[str, str], *, name: str = "callahead") -> None:
        self.milter_port = free_port()
        self.policy_port = free_port()
        self.metrics_port = free_port()
        self.admin_socket = workdir / f"{name}.admin.sock"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CALLAHEAD_")},
            "CALLAHEAD_SOCKET": f"inet:127.0.0.1:{self.milter_port}",
            # Both front ends: a test picks one with the backup listener it sends to.
            "CALLAHEAD_POLICY_LISTEN": f"inet:127.0.0.1:{self.policy_port}",
            "CALLAHEAD_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "CALLAHEAD_HELO_NAME": "backup.test",
            "CALLAHEAD_LOG_LEVEL": "DEBUG",
            # Its own admin socket: the default one in /run would be shared by all.
            "CALLAHEAD_ADMIN_SOCKET": str(self.admin_socket),
            **env,
        }
        self.env = env
        super().__init__(
            [sys.executable, "-m", "callahead", "serve"],
            workdir / f"{name}.log",
            env=env,
            what=f"callahead on port {self.milter_port}",
            ready=self._ready,
            stop_timeout=STOP_TIMEOUT,
        )

    def _ready(self) -> bool:
        return (
            (not self.env["CALLAHEAD_SOCKET"] or accepts(self.milter_port))
            and (not self.env["CALLAHEAD_POLICY_LISTEN"] or accepts(self.policy_port))
            and self._metrics_up()
        )

    @property
    def socket(self) -> str:
        """The value for Postfix's ``smtpd_milters``."""
        return f"inet:127.0.0.1:{self.milter_port}"

    @property
    def policy_service(self) -> str:
        """The service for Postfix's ``check_policy_service``."""
        return f"inet:127.0.0.1:{self.policy_port}"

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``python -m callahead ARGS`` with this process's environment (so
        ``cache`` and ``status`` reach it over its admin socket)."""
        return subprocess.run(
            [sys.executable, "-m", "callahead", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def _metrics_up(self) -> bool:
        try:
            self.scrape()
            return True
        except OSError:
            return False

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
