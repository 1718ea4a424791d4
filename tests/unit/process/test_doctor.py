"""The pieces of ``callahead doctor`` that need no Postfix: the environment file, the
hook entries and where a chrooted smtpd finds a socket, the policy order. The whole
command runs against real Postfix configurations in tests/integration/test_doctor.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from callahead.process.doctor.checkup import EnvFileError, doctor_environment, read_env_file
from callahead.process.doctor.postfixhooks import Attached, check_policy_order
from callahead.process.doctor.postfixview import PostfixView, Service
from tests.harness.fixtures import make_workdir


def test_the_env_file_reads_as_systemd_does_and_wins_over_the_shell(tmp_path: Path) -> None:
    env_file = tmp_path / "callahead"
    env_file.write_text(
        '# comment\n\nCALLAHEAD_ROUTES="a.test=[192.0.2.1]:25 b.test=[192.0.2.2]"\n'
        "CALLAHEAD_HELO_NAME='mx.example.com'\nCALLAHEAD_SOCKET=inet:127.0.0.1:8895\n"
    )
    assert read_env_file(str(env_file)) == {
        "CALLAHEAD_ROUTES": "a.test=[192.0.2.1]:25 b.test=[192.0.2.2]",
        "CALLAHEAD_HELO_NAME": "mx.example.com",
        "CALLAHEAD_SOCKET": "inet:127.0.0.1:8895",
    }
    merged = doctor_environment({"CALLAHEAD_SOCKET": "x", "PATH": "/bin"}, str(env_file))
    assert merged["CALLAHEAD_SOCKET"] == "inet:127.0.0.1:8895"
    assert merged["PATH"] == "/bin"
    assert doctor_environment({"A": "1"}, "") == {"A": "1"}


def test_an_env_file_that_cannot_be_read_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EnvFileError, match="cannot read"):
        read_env_file(str(tmp_path / "missing"))


def view(main: dict[str, str], *services: Service) -> PostfixView:
    return PostfixView("/etc/postfix", {"queue_directory": "/var/spool/postfix", **main}, services)


SMTP = Service("smtp", "inet", chroot=True)
PLAIN = Service("127.0.0.1:2525", "inet", chroot=False)


def test_hook_entries_with_options_and_where_the_socket_is_found() -> None:
    v = view(
        {"smtpd_milters": "{ unix:callahead/milter.sock, default_action = accept }, inet:[::1]:9"},
        SMTP,
    )
    first, second = v.milters(SMTP)
    assert (first.endpoint, dict(first.options), first.family) == (
        "unix:callahead/milter.sock",
        {"default_action": "accept"},
        "unix",
    )
    assert (second.family, second.address) == ("inet", "[::1]:9")
    # Relative: the queue directory, chrooted or not; absolute: inside it when chrooted.
    assert v.host_path(SMTP, "callahead/milter.sock") == "/var/spool/postfix/callahead/milter.sock"
    assert v.host_path(PLAIN, "callahead/milter.sock") == "/var/spool/postfix/callahead/milter.sock"
    assert v.host_path(SMTP, "/run/c.sock") == "/var/spool/postfix/run/c.sock"
    assert v.host_path(PLAIN, "/run/c.sock") == "/run/c.sock"


@pytest.mark.parametrize(
    ("relay", "recipient", "ok"),
    [
        ("", "permit_mynetworks, reject_unauth_destination, check_policy_service inet:x:1", True),
        ("", "check_policy_service inet:x:1, reject_unauth_destination", False),
        ("defer_unauth_destination", "check_policy_service inet:x:1", True),
        ("", "check_policy_service { inet:x:1, default_action=DUNNO }", False),
    ],
)
def test_the_policy_check_must_follow_the_relay_check(relay: str, recipient: str, ok: bool) -> None:
    v = view({"smtpd_relay_restrictions": relay, "smtpd_recipient_restrictions": recipient}, PLAIN)
    (hook,) = v.policies(PLAIN)
    assert hook.address == "x:1"
    (finding,) = check_policy_order(v, [Attached(PLAIN, hook)])
    assert finding.ok is ok
    assert finding.item == "policy-order"


def test_a_known_that_is_not_an_address_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from callahead.process.cli import main
    from callahead.process.probecmd import EX_USAGE

    assert main(["doctor", "--env-file=", "--known", "nobody"], env={}) == EX_USAGE
    assert "--known 'nobody' is not an address" in capsys.readouterr().err


def test_a_tcp_front_end_is_a_warning_that_passes_and_says_who_can_reach_it() -> None:
    from callahead.process.config import load_config
    from callahead.process.doctor.postfixhooks import check_exposure, report

    config = load_config(
        {"CALLAHEAD_SOCKET": "inet:127.0.0.1:8895", "CALLAHEAD_POLICY_LISTEN": "inet:[::1]:8896"}
    )
    milter, policy = check_exposure(config, view({}))
    assert (milter.item, milter.ok, milter.warn) == ("exposure", True, True)
    assert milter.what.startswith("milter CALLAHEAD_SOCKET=inet:127.0.0.1:8895 is a TCP port")
    assert "every local user can reach" in milter.what
    assert policy.what.startswith("policy CALLAHEAD_POLICY_LISTEN=inet:[::1]:8896")
    lines, passed = report([milter, policy])
    assert passed  # mail is verified: the exit status stays 0
    assert lines[0].startswith("warn exposure: milter CALLAHEAD_SOCKET=inet:127.0.0.1:8895")
    assert lines[1] == (
        "     fix: use the unix socket instead: "
        "CALLAHEAD_SOCKET=unix:/var/spool/postfix/callahead/milter.sock "
        "and smtpd_milters = unix:callahead/milter.sock"
    )


def test_a_unix_socket_only_postfix_can_reach_passes_the_exposure_item() -> None:
    with make_workdir() as workdir:
        _check_unix_exposure(workdir)


def _check_unix_exposure(tmp_path: Path) -> None:
    from callahead.process.config import load_config
    from callahead.process.doctor.postfixhooks import check_exposure

    closed = tmp_path / "callahead"
    closed.mkdir(mode=0o770)
    closed.chmod(0o770)
    open_ = tmp_path / "open"
    open_.mkdir()
    open_.chmod(0o777)
    config = load_config(
        {
            "CALLAHEAD_SOCKET": f"unix:{closed}/milter.sock",
            "CALLAHEAD_POLICY_LISTEN": f"unix:{open_}/policy.sock",
        }
    )
    milter, policy = check_exposure(config, view({}))
    assert (milter.ok, milter.warn) == (True, False)
    assert f"{closed} (drwxrwx---" in milter.what
    assert "keeps every other local user out" in milter.what
    assert milter.lines() == [f"ok   exposure: {milter.what}"]
    assert (policy.ok, policy.warn) == (True, True)
    assert "remove the socket and listen there" in policy.what
    assert "/var/spool/postfix/callahead (root:postfix 0770" in policy.lines()[1]
