"""Postfix's hooks checked by the running service (process/hookcheck.py), and doctor
reading the unit's own Environment=, in the booted container of conftest.py: the
package's unit (DynamicUser, ProtectSystem=strict, the system call filter) runs postconf
on Debian's Postfix, whose smtpd is chrooted; systemd 252's ``systemctl show`` gives
the drop-in's environment."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.harness.waiting import wait_for

from .conftest import BACKUP_HOST, SOCKET_DIR, System

NOT_HOOKED = "does not hook callahead where it listens"
DROPIN_DIR = "/etc/systemd/system/callahead.service.d"


def hooked() -> dict[str, float]:
    url = f"http://{BACKUP_HOST}:9895/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        sample.labels["frontend"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "callahead_postfix_hooked"
        for sample in family.samples
    }


def test_the_package_s_setup_is_hooked_and_says_so(system: System) -> None:
    line = f"hooks callahead: milter unix:{SOCKET_DIR}/milter.sock named by smtp/inet"
    wait_for(lambda: line in system.journal(), 30, interval=0.2, what="the hooks line")
    assert hooked() == {"milter": 1.0, "policy": 1.0}
    assert NOT_HOOKED not in system.journal()


def test_main_cf_naming_0_1_s_port_is_one_error_line_after_a_reload(system: System) -> None:
    """Both hooks moved elsewhere (the milter to 0.1's TCP port); ``systemctl reload``
    checks again; put back and reloaded, the gauge is 1 again."""
    saved = {
        name: system.sh(f"postconf -h {name}").strip()
        for name in ("smtpd_milters", "callahead_policy_restrictions")
    }
    cursor = system.cursor()
    try:
        system.sh(
            "postconf -e smtpd_milters=inet:127.0.0.1:8895 "
            "'callahead_policy_restrictions=reject_unauth_destination'"
        )
        system.sh("systemctl reload callahead")
        wait_for(lambda: NOT_HOOKED in system.journal(cursor), 30, interval=0.2, what="error")
        assert hooked() == {"milter": 0.0, "policy": 0.0}
        (line,) = [x for x in system.journal(cursor).splitlines() if NOT_HOOKED in x]
        assert "name milters inet:127.0.0.1:8895 and no policy service" in line
        assert f"callahead listens: milter unix:{SOCKET_DIR}/milter.sock" in line
        assert "fix: smtpd_milters = unix:callahead/milter.sock or" in line
        assert system.unit("ActiveState") == "active"
    finally:
        for name, value in saved.items():
            system.sh(f"postconf -e '{name}={value}'")
        system.sh("systemctl reload callahead")
    wait_for(
        lambda: hooked() == {"milter": 1.0, "policy": 1.0}, 30, interval=0.2, what="hooked again"
    )


def test_doctor_reads_the_unit_s_drop_in(system: System) -> None:
    """The package's upgrade drop-in keeps 0.1's TCP listener: doctor checks that
    address, as the service would listen after its next restart, and names a value
    with a space that ``systemctl show`` cannot print."""
    system.sh(
        f"mkdir -p {DROPIN_DIR} && printf '%s\\n' '[Service]' "
        "'Environment=CALLAHEAD_SOCKET=inet:127.0.0.1:8895' "
        "'Environment=\"CALLAHEAD_UNUSED_WITH_SPACE=a b\"' "
        f"> {DROPIN_DIR}/test-dropin.conf && systemctl daemon-reload"
    )
    try:
        done = system.container.run(["callahead", "doctor"], check=False, timeout=120)
    finally:
        system.sh(f"rm -f {DROPIN_DIR}/test-dropin.conf && systemctl daemon-reload")
    out = done.stdout
    assert done.returncode == 1, out
    assert "does not attach callahead" in out, out
    assert "smtpd_milters = inet:127.0.0.1:8895" in out, out
    assert "value(s) with a space that systemctl show cannot print" in done.stderr
