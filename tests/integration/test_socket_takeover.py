"""A second ``callahead serve`` never takes the unix milter socket of a running one.

libmilter's ``opensocket(True)`` unlinks whatever socket is at the path and binds its
own: a second serve (a manual start beside the unit, a test run) took the path, and
when it exited the first ran on unreachable while Postfix accepted every recipient
unverified (``milter_default_action = accept``). Now the second exits 69 saying that
another process answers there, as it does for a TCP port in use, and the first still
answers on the socket; a stale socket (a callahead that died) is still replaced.

Run with the venv's pymilter and with Debian's python3-milter (the package's)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.callahead_process import CallaheadProcess
from tests.harness.milterclient import MilterClient
from tests.harness.ports import accepts
from tests.harness.primary import Primary
from tests.harness.waiting import wait_for
from tests.integration.conftest import ONE_USER

KNOWN = ONE_USER
EX_UNAVAILABLE = 69
CHECKOUT_PACKAGES = Path(__file__).resolve().parents[2] / "milter"
DEBIAN_PYTHON = "/usr/bin/python3"

PYTHONS = {"venv": sys.executable, "debian": DEBIAN_PYTHON}
"""The interpreter each run uses: the venv's pymilter, or Debian's python3-milter
(with the checkout's callahead on PYTHONPATH)."""


class UnixMilterClient(MilterClient):
    """A ``MilterClient`` on a unix socket."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:  # not MilterClient's TCP
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))


def unix_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class UnixMilterCallahead(CallaheadProcess):
    """``callahead serve`` with its milter on the unix socket ``path`` (its policy
    service, metrics and admin socket its own), run by ``python`` as the unit runs it."""

    def __init__(
        self, workdir: Path, primary: Primary, path: Path, *, name: str, python: str
    ) -> None:
        env = {
            "CALLAHEAD_ROUTES": "example.test=[{}]:{}".format(*primary.address),
            "CALLAHEAD_SOCKET": f"unix:{path}",
        }
        if python != sys.executable:
            env["PYTHONPATH"] = str(CHECKOUT_PACKAGES)
        super().__init__(workdir, env, name=name)
        self.milter_path = path
        # As the unit runs it: the postfix group (which must reach the socket), UMask 0007.
        umask = 'umask 0007 && exec "$0" "$@"'
        self.argv = ["setpriv", "--regid=postfix", "--clear-groups", "sh", "-c", umask, python]
        self.argv += ["-m", "callahead", "serve"]

    def _ready(self) -> bool:
        return unix_accepts(self.milter_path) and accepts(self.policy_port) and self._metrics_up()

    def run_to_exit(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run it in the foreground until it exits (a second serve that must not start)."""
        return subprocess.run(
            self.argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )


def ask(path: Path, recipient: str) -> tuple[bytes, str]:
    """The milter's answer to one RCPT on a new connection to ``path``."""
    with UnixMilterClient(path) as client:
        assert client.negotiate().command == b"O"
        reply = client.rcpt(f"<{recipient}>".encode())
        client.quit()
        return reply.command, reply.text


@pytest.fixture(params=sorted(PYTHONS))
def python(request: pytest.FixtureRequest) -> str:
    chosen = PYTHONS[request.param]
    imports = [chosen, "-c", "import milter, redis, dns, prometheus_client"]
    if (
        not os.path.exists(chosen)
        or subprocess.run(imports, capture_output=True, check=False).returncode != 0
    ):
        pytest.skip(f"{chosen} with callahead's dependencies is not installed")
    return chosen


def test_a_second_serve_exits_69_and_the_first_keeps_its_socket(
    workdir: Path, known_primary: Primary, python: str
) -> None:
    path = workdir / "milter.sock"
    first = UnixMilterCallahead(workdir, known_primary, path, name="first", python=python)
    first.start()
    try:
        assert ask(path, KNOWN)[0] == b"c"
        inode = path.stat().st_ino

        second = UnixMilterCallahead(workdir, known_primary, path, name="second", python=python)
        done = second.run_to_exit()

        assert done.returncode == EX_UNAVAILABLE, done.stderr
        assert f"cannot serve the milter on unix:{path}" in done.stderr
        assert f"another process answers on {path}; not touching it" in done.stderr
        assert path.stat().st_ino == inode  # the first's socket, never unlinked
        command, text = ask(path, "stranger@example.test")
        assert (command, text[:3]) == (b"y", "550"), text
        assert not first.exited()
    finally:
        first.stop()


def test_a_stale_socket_of_a_callahead_that_died_is_replaced(
    workdir: Path, known_primary: Primary, python: str
) -> None:
    path = workdir / "milter.sock"
    dead = UnixMilterCallahead(workdir, known_primary, path, name="dead", python=python)
    dead.start()
    assert dead.pid is not None
    os.kill(dead.pid, signal.SIGKILL)  # no clean-up: its socket file stays
    wait_for(dead.exited, 10.0, what="the killed callahead to exit")
    dead.stop()
    assert path.is_socket() and not unix_accepts(path)

    again = UnixMilterCallahead(workdir, known_primary, path, name="again", python=python)
    again.start()
    try:
        assert ask(path, KNOWN)[0] == b"c"
    finally:
        again.stop()
