"""serve's check of Postfix's hooks (process/hookcheck.py) on Postfix views made by hand:
which front end an smtpd service names where callahead listens (a chrooted one, the
``-o`` overrides, a policy entry with options, another instance), the one line and the
gauge. Against a real Postfix and a running serve: tests/integration/test_hookcheck.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from callahead.frontends.metrics import Metrics
from callahead.process.config import Config, load_config
from callahead.process.doctor.postfixview import PostfixView, Service
from callahead.process.hookcheck import (
    HookCheck,
    front_ends,
    judge,
    postfix_directory,
    read_instances,
)
from callahead.routing.postfixsettings import PostfixConfigError

QUEUE = "/var/spool/postfix"
MILTER = f"{QUEUE}/callahead/milter.sock"
POLICY = f"{QUEUE}/callahead/policy.sock"
SMTP = Service("smtp", "inet", chroot=True)
PLAIN = Service("smtp", "inet", chroot=False)
SUBMISSION = Service("submission", "inet", chroot=True)


def config(**env: str) -> Config:
    return load_config(
        {
            "CALLAHEAD_ROUTES": "example.com=[192.0.2.1]",
            "CALLAHEAD_HELO_NAME": "backup.example.net",
            **{f"CALLAHEAD_{k.upper()}": v for k, v in env.items()},
        }
    )


UNIX = config()
"""The default: the milter on its unix socket, no policy service."""
BOTH = config(policy_listen=f"unix:{POLICY}")


def view(main: dict[str, str], *services: Service, directory: str = "/etc/postfix") -> PostfixView:
    return PostfixView(directory, {"queue_directory": QUEUE, **main}, services)


def test_the_upgrade_case_is_one_error_naming_both_addresses_and_the_fix() -> None:
    """0.1's main.cf names the TCP port; 0.2 listens on the unix socket."""
    verdict = judge(front_ends(UNIX), [view({"smtpd_milters": "inet:127.0.0.1:8895"}, SMTP)])

    assert verdict.level == logging.ERROR
    assert dict(verdict.hooked) == {"milter": False}
    line = verdict.line
    assert "Postfix /etc/postfix does not hook callahead where it listens" in line
    assert "callahead verifies no recipient" in line
    assert "name milters inet:127.0.0.1:8895 and no policy service" in line
    assert f"callahead listens: milter unix:{MILTER}" in line
    assert "fix: smtpd_milters = unix:callahead/milter.sock in main.cf" in line
    assert "systemctl reload callahead" in line


@pytest.mark.parametrize(
    ("service", "named", "hooked"),
    [
        (SMTP, "unix:callahead/milter.sock", True),  # relative: the queue directory
        (SMTP, "{ unix:callahead/milter.sock, default_action = accept }", True),
        (PLAIN, f"unix:{MILTER}", True),  # absolute, not chrooted: that path
        (SMTP, f"unix:{MILTER}", False),  # chrooted: inside the queue directory
        (SMTP, "unix:callahead/other.sock", False),
        (SMTP, "inet:127.0.0.1:8895", False),
        (SMTP, "", False),
    ],
)
def test_a_milter_is_matched_where_smtpd_looks_for_it(
    service: Service, named: str, hooked: bool
) -> None:
    verdict = judge(front_ends(UNIX), [view({"smtpd_milters": named}, service)])
    assert dict(verdict.hooked) == {"milter": hooked}
    assert verdict.level == (logging.INFO if hooked else logging.ERROR)


def test_a_chrooted_smtpd_naming_the_host_path_is_told_where_it_looks() -> None:
    verdict = judge(front_ends(UNIX), [view({"smtpd_milters": f"unix:{MILTER}"}, SMTP)])
    assert f"smtp/inet runs chrooted in {QUEUE} and looks for {QUEUE}{MILTER}" in verdict.line, (
        verdict.line
    )


def test_a_master_cf_override_counts_for_its_service() -> None:
    """main.cf names the old port; smtp's ``-o smtpd_milters`` names the socket."""
    smtp = Service("smtp", "inet", True, {"smtpd_milters": "unix:callahead/milter.sock"})
    verdict = judge(
        front_ends(UNIX), [view({"smtpd_milters": "inet:127.0.0.1:8895"}, smtp, SUBMISSION)]
    )
    assert dict(verdict.hooked) == {"milter": True}
    assert verdict.line == (
        f"Postfix /etc/postfix hooks callahead: milter unix:{MILTER} named by smtp/inet"
    )


@pytest.mark.parametrize(
    ("listen", "restrictions", "hooked"),
    [
        (
            "inet:127.0.0.1:8896",
            "reject_unauth_destination, check_policy_service inet:127.0.0.1:8896",
            True,
        ),
        (
            "inet:127.0.0.1:8896",
            "reject_unauth_destination, check_policy_service "
            "{ inet:localhost:8896, timeout=10s, default_action=DUNNO }",
            True,
        ),
        ("inet:127.0.0.1:8896", "check_policy_service 127.0.0.1:8896", True),  # bare: inet
        ("inet:127.0.0.1:8896", "check_policy_service inet:127.0.0.1:8897", False),
        (f"unix:{POLICY}", "check_policy_service unix:callahead/policy.sock", True),
        (f"unix:{POLICY}", "check_policy_service inet:127.0.0.1:8896", False),
    ],
)
def test_a_policy_service_is_matched_in_the_restriction_lists(
    listen: str, restrictions: str, hooked: bool
) -> None:
    fronts = front_ends(config(socket="", policy_listen=listen))
    verdict = judge(fronts, [view({"smtpd_recipient_restrictions": restrictions}, SMTP)])
    assert dict(verdict.hooked) == {"policy": hooked}
    if not hooked:
        assert "fix: check_policy_service " in verdict.line
        assert "after reject_unauth_destination in main.cf" in verdict.line


def test_with_both_front_ends_one_named_is_no_error_and_the_other_shows_unused() -> None:
    verdict = judge(front_ends(BOTH), [view({"smtpd_milters": "unix:callahead/milter.sock"}, SMTP)])
    assert verdict.level == logging.INFO
    assert dict(verdict.hooked) == {"milter": True, "policy": False}
    assert f"policy service unix:{POLICY} named by no smtpd service (unused)" in verdict.line


def test_with_both_front_ends_named_nowhere_the_fix_gives_either() -> None:
    verdict = judge(front_ends(BOTH), [view({}, SMTP)])
    assert verdict.level == logging.ERROR
    assert dict(verdict.hooked) == {"milter": False, "policy": False}
    assert "name no milter and no policy service" in verdict.line
    assert (
        "fix: smtpd_milters = unix:callahead/milter.sock or check_policy_service "
        "unix:callahead/policy.sock after reject_unauth_destination in main.cf"
    ) in verdict.line


def test_a_front_end_other_hosts_reach_is_no_error_when_not_named_here() -> None:
    """A policy service on 0.0.0.0 may serve other hosts' Postfix: nothing to say."""
    fronts = front_ends(
        config(socket="", policy_listen="inet:0.0.0.0:8896", policy_clients="192.0.2.0/24")
    )
    assert not fronts[0].local
    verdict = judge(fronts, [view({}, SMTP)])
    assert verdict.level == logging.INFO
    assert dict(verdict.hooked) == {}
    named = judge(
        fronts,
        [view({"smtpd_recipient_restrictions": "check_policy_service inet:127.0.0.1:8896"}, SMTP)],
    )
    assert dict(named.hooked) == {"policy": True}


def test_another_instance_of_postmulti_counts() -> None:
    """The default instance names nothing; the enabled MX instance names the socket; a
    disabled one is not read as running."""
    views = {
        "/etc/postfix": view(
            {"multi_instance_directories": "/etc/postfix-mx /etc/postfix-off"}, SMTP
        ),
        "/etc/postfix-mx": view(
            {"multi_instance_enable": "yes", "smtpd_milters": "unix:callahead/milter.sock"},
            SMTP,
            directory="/etc/postfix-mx",
        ),
        "/etc/postfix-off": view(
            {"smtpd_milters": "unix:callahead/milter.sock"}, SMTP, directory="/etc/postfix-off"
        ),
    }
    read = read_instances("/etc/postfix", views.__getitem__)
    assert [v.config_dir for v in read] == ["/etc/postfix", "/etc/postfix-mx"]
    verdict = judge(front_ends(UNIX), read)
    assert dict(verdict.hooked) == {"milter": True}
    assert "Postfix /etc/postfix and /etc/postfix-mx hooks callahead" in verdict.line


def test_which_postfix_is_read(tmp_path: Path) -> None:
    assert postfix_directory(UNIX, {"MAIL_CONFIG": str(tmp_path)}) == (
        None,
        f"CALLAHEAD_POSTFIX_CONFIG is empty and {tmp_path}/main.cf does not exist",
    )
    (tmp_path / "main.cf").write_text("")
    assert postfix_directory(UNIX, {"MAIL_CONFIG": str(tmp_path)}) == (str(tmp_path), "")
    remote = config(socket="inet:0.0.0.0:8895")
    directory, because = postfix_directory(remote, {"MAIL_CONFIG": str(tmp_path)})
    assert directory is None
    assert "CALLAHEAD_SOCKET=inet:0.0.0.0:8895 is not on loopback" in because


def samples(metrics: Metrics) -> dict[str, float]:
    return {
        sample.labels["frontend"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "callahead_postfix_hooked"
        for sample in family.samples
    }


def test_the_check_sets_the_gauge_and_logs_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "main.cf").write_text("")
    metrics = Metrics()
    wrong = view({"smtpd_milters": "inet:127.0.0.1:8895"}, SMTP, directory=str(tmp_path))
    check = HookCheck(UNIX, metrics, {"MAIL_CONFIG": str(tmp_path)}, lambda _d: wrong)
    caplog.set_level(logging.INFO, logger="callahead.hookcheck")

    verdict = check.run()

    assert verdict is not None
    assert samples(metrics) == {"milter": 0.0}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.ERROR, verdict.line)]


def test_postfix_that_cannot_be_read_is_one_warning_and_no_gauge(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a good read (gauge 1), a SIGHUP whose read fails takes the gauge away:
    it no longer says what is true."""
    (tmp_path / "main.cf").write_text("")
    metrics = Metrics()
    good = view({"smtpd_milters": "unix:callahead/milter.sock"}, SMTP, directory=str(tmp_path))
    reads = [good]

    def read(directory: str) -> PostfixView:
        if not reads:
            raise PostfixConfigError(f"postconf -c {directory} -x: fatal: bad main.cf")
        return reads.pop()

    check = HookCheck(UNIX, metrics, {"MAIL_CONFIG": str(tmp_path)}, read)
    caplog.set_level(logging.INFO, logger="callahead.hookcheck")
    check.run()
    assert samples(metrics) == {"milter": 1.0}
    caplog.clear()

    assert check.run() is None

    assert samples(metrics) == {}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            "cannot read Postfix's configuration to check its hooks: "
            f"postconf -c {tmp_path} -x: fatal: bad main.cf",
        )
    ]


def test_without_a_postfix_to_read_there_is_no_gauge_and_an_info_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    check = HookCheck(UNIX, metrics, {"MAIL_CONFIG": str(tmp_path)})
    caplog.set_level(logging.INFO, logger="callahead.hookcheck")
    assert check.run() is None
    assert samples(metrics) == {}
    assert [r.levelno for r in caplog.records] == [logging.INFO]
