"""The package's unix-socket defaults against a local user, in the booted container:
with no CALLAHEAD_SOCKET in /etc/default/callahead, the milter listens on
/var/spool/postfix/callahead/milter.sock (the policy service, as the README sets it, on
policy.sock beside it), a directory only root and the postfix group can enter. A user
outside that group (``nobody``) can neither connect to either socket nor bind one in
their place, the admin socket answers root alone (not even the postfix group), and
Postfix's mail still gets its verdicts through them (issue 26, item 3 and item 9's admin
socket). Nothing of callahead listens on TCP but the metrics endpoint."""

from __future__ import annotations

import json
import subprocess
import uuid

from tests.harness.client import make_message, send

from .conftest import BACKUP_HOST, DOMAIN, KNOWN, POLICY_PORT, SOCKET_DIR, System

SENDER = "sender@remote.test"
ADMIN_SOCKET = "/run/callahead/admin.sock"
EX_NOPERM = 77
TRY = """
import errno, json, os, socket, sys
out = {}
for path in sys.argv[2:]:
    for action in sys.argv[1].split(","):
        try:
            if action == "unlink":
                os.unlink(path)
            else:
                with socket.socket(socket.AF_UNIX) as sock:
                    getattr(sock, action)(path)
            out[f"{path} {action}"] = "done"
        except OSError as exc:
            out[f"{path} {action}"] = errno.errorcode.get(exc.errno, str(exc))
print(json.dumps(out))
"""
"""Each action of the first argument (connect, bind, unlink, comma-separated) tried on
each path after it; what came of it."""
TCP_LISTENERS = """
import ipaddress, os, sys
pid = sys.argv[1]
mine = set()
for fd in os.listdir(f"/proc/{pid}/fd"):
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    if target.startswith("socket:["):
        mine.add(target[8:-1])
for table in ("tcp", "tcp6"):
    with open(f"/proc/net/{table}") as lines:
        next(lines)
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in mine:  # LISTEN, one of its sockets
                host, port = fields[1].split(":")
                raw = bytes.fromhex(host)
                packed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                print(f"{ipaddress.ip_address(packed)}:{int(port, 16)}")
"""
"""The TCP addresses a process (its pid the argument) listens on."""


def attempts(system: System, user: list[str], actions: str, paths: list[str]) -> dict[str, str]:
    """What ``user`` (a runuser or setpriv prefix) got trying ``actions`` on each path."""
    done = system.container.run([*user, "python3", "-c", TRY, actions, *paths], timeout=60)
    result: dict[str, str] = json.loads(done.stdout)
    return result


NOBODY = ["runuser", "-u", "nobody", "--"]
POSTFIX = ["setpriv", "--reuid=postfix", "--regid=postfix", "--init-groups"]


def status_as(system: System, user: list[str]) -> subprocess.CompletedProcess[str]:
    return system.container.run([*user, "callahead", "status"], check=False, timeout=60)


def rcpt_code(addr: str, port: int) -> int:
    _token, body = make_message(SENDER, [addr])
    return send(port, SENDER, [addr], body, host=BACKUP_HOST).code(addr)


def test_the_milter_listens_on_the_packages_unix_socket_by_default(system: System) -> None:
    pid = system.wait_active()
    assert "CALLAHEAD_SOCKET" not in system.sh("cat /etc/default/callahead")
    effective = system.sh("callahead config")
    assert f"CALLAHEAD_SOCKET=unix:{SOCKET_DIR}/milter.sock" in effective.splitlines()
    # Made by the package's tmpfiles entry: only root and the postfix group get in.
    assert system.sh(f"stat -c '%A %U %G' {SOCKET_DIR}").split() == [
        "drwxrwx---",
        "root",
        "postfix",
    ]
    # No TCP listener of callahead's but /metrics (the container shares the host's
    # network, so the process's own sockets are looked up, not the ports).
    listening = system.container.run(["python3", "-c", TCP_LISTENERS, str(pid)]).stdout
    assert listening.split() == [f"{BACKUP_HOST}:9895"], listening
    start = system.journal()
    assert f"callahead listening: milter unix:{SOCKET_DIR}/milter.sock" in start
    assert "every local user can reach" not in start


def test_a_local_user_can_neither_connect_nor_bind_in_their_place(system: System) -> None:
    system.wait_active()
    sockets = [f"{SOCKET_DIR}/milter.sock", f"{SOCKET_DIR}/policy.sock"]
    squat = f"{SOCKET_DIR}/squat-{uuid.uuid4().hex[:8]}.sock"
    tried = attempts(system, NOBODY, "connect,bind,unlink", [*sockets, squat])
    # Each refused by the directory's mode (no search permission), before any socket.
    assert set(tried.values()) == {"EACCES"}, tried
    assert len(tried) == 9
    # The same connect as smtpd's user works (so what refused nobody was the
    # permission, not the script), and the sockets are still callahead's afterwards.
    # (Only connect: the postfix group may write to the directory, as callahead's own
    # group must, to make its sockets there.)
    as_postfix = attempts(system, POSTFIX, "connect", sockets)
    assert [as_postfix[f"{path} connect"] for path in sockets] == ["done", "done"], as_postfix
    assert system.sh(f"ls {SOCKET_DIR}").split() == ["milter.sock", "policy.sock"]
    system.sh(f"rm -f {squat}")  # (if the bind had worked, what it left)


def test_the_admin_socket_answers_root_alone(system: System) -> None:
    system.wait_active()
    owner = system.sh(f"stat -c '%A %G' {ADMIN_SOCKET}").split()
    assert owner == ["srw-------", "postfix"], owner  # the unit's group: no group bits
    for user in (NOBODY, POSTFIX):
        refused = status_as(system, user)
        assert refused.returncode == EX_NOPERM, (user, refused.stdout, refused.stderr)
        assert "Permission denied): run as root" in refused.stderr, refused.stderr
        flush = system.container.run(
            [*user, "callahead", "cache", "flush", "--all"], check=False, timeout=60
        )
        assert flush.returncode == EX_NOPERM, (user, flush.stdout, flush.stderr)
    assert status_as(system, []).returncode in (0, 1)  # root: healthy or degraded


def test_mail_still_gets_its_verdicts_through_the_unix_sockets(system: System) -> None:
    system.wait_active()
    unknown = f"u{uuid.uuid4().hex[:12]}@{DOMAIN}"
    assert rcpt_code(KNOWN[2], 25) == 250  # the milter
    assert rcpt_code(unknown, 25) == 550
    assert rcpt_code(KNOWN[2], POLICY_PORT) == 250  # the policy service
    assert rcpt_code(unknown, POLICY_PORT) == 550
