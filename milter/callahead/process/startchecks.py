"""What ``serve`` checks of its configuration before it listens, and ``doctor`` reports
too: an answer Postfix would give up on, an EHLO name primaries refuse, a milter or
policy service on a TCP port (which every local user can reach)."""

from __future__ import annotations

from ..probing.loop import HANDOFF_MARGIN
from .assembly import answer_time, engine_settings, route_wait, shared_delay
from .config import Config
from .endpoints import Listen, loopback_host, parse_listen
from .postfixconf import is_fully_qualified, postfix_milter_command_timeout
from .variables import DEFAULT_SOCKET, POLICY_SOCKET


def answer_time_problem(
    config: Config, timeout: float | None = None, setting: str = "milter_command_timeout"
) -> str | None:
    """Why Postfix would give up on callahead's answers, if it would: the longest answer
    (the route lookup in the Postfix maps, a wait for a probe slot, the probe, the thread
    handoff) must stay below the local Postfix's milter_command_timeout. None when it
    does, or when there is no Postfix to ask (then serve warns against Postfix's
    default)."""
    if timeout is None:
        timeout = postfix_milter_command_timeout()
    longest = answer_time(config)
    if timeout is None or longest < timeout:
        return None
    engine_longest = engine_settings(config).longest_answer + shared_delay(config)
    redis = (
        " (+ CALLAHEAD_REDIS_LOCK_WAIT and 3 CALLAHEAD_REDIS_TIMEOUT)"
        if config.shared_redis
        else ""
    )
    lookup = route_wait(config)
    lookups = (
        f" the {lookup:g}s route lookups in CALLAHEAD_POSTFIX_CONFIG's maps and" if lookup else ""
    )
    return (
        f"CALLAHEAD_PROBE_WAIT + CALLAHEAD_PROBE_TIMEOUT{redis} = "
        f"{engine_longest:g}s: with{lookups} the {HANDOFF_MARGIN:g}s "
        f"handoff an answer can take {longest:g}s, and this host's Postfix gives up after "
        f"{setting} = {timeout:g}s (then it stops asking callahead for the rest "
        f"of the session); lower them or raise {setting}"
    )


def helo_warning(helo: str) -> str | None:
    """A warning for an EHLO name that primaries with reject_non_fqdn_helo_hostname
    refuse; None when it is fully qualified."""
    if is_fully_qualified(helo):
        return None
    return (
        f"the probes' EHLO name {helo!r} is not fully qualified: primaries with "
        "reject_non_fqdn_helo_hostname refuse it and callahead can then reject nobody; "
        "set CALLAHEAD_HELO_NAME (or Postfix's myhostname) to this host's public name"
    )


PRIVILEGED_PORTS = 1024
"""Ports below this only root may bind (Linux's default ip_unprivileged_port_start)."""

_SQUATTER = {
    "CALLAHEAD_SOCKET": "get every message Postfix passes to its milter, to read and change",
    "CALLAHEAD_POLICY_LISTEN": "answer Postfix's policy requests (REDIRECT, BCC ...)",
}
_UNIX_FIX = {
    "CALLAHEAD_SOCKET": f"CALLAHEAD_SOCKET={DEFAULT_SOCKET} and smtpd_milters = "
    "unix:callahead/milter.sock",
    "CALLAHEAD_POLICY_LISTEN": f"CALLAHEAD_POLICY_LISTEN={POLICY_SOCKET} and "
    "check_policy_service unix:callahead/policy.sock",
}


def tcp_exposure(variable: str, listen: Listen) -> tuple[str, str] | None:
    """Who can reach an ``inet:`` front end and what they can do there, and the fix;
    None for a unix socket."""
    if listen.kind != "inet":
        return None
    local = loopback_host(listen.host)
    if local:
        who = "is a TCP port on loopback, which every local user can reach"
    elif variable == "CALLAHEAD_POLICY_LISTEN":
        who = "listens off loopback: every local user can reach it, and every host that "
        who += "CALLAHEAD_POLICY_CLIENTS admits"
    else:
        who = "listens off loopback: every local user can reach it, and every host that can connect"
    squat = (
        f", and while callahead is not listening any local user can listen there first "
        f"and {_SQUATTER[variable]}"
        if listen.port >= PRIVILEGED_PORTS
        else ""
    )
    fix = (
        f"use the unix socket instead: {_UNIX_FIX[variable]}"
        if local
        else "firewall the port to the Postfix hosts, or, with Postfix on this host, use "
        f"the unix socket: {_UNIX_FIX[variable]}"
    )
    what = (
        f"{variable}={listen} {who}: any of them can ask which addresses exist, naming "
        f"the client address the dictionary guard counts{squat}"
    )
    return what, fix


def exposure_warnings(config: Config) -> list[str]:
    """A warning per front end on a TCP port: on loopback every local user can reach it
    (a unix socket in SOCKET_DIRECTORY only root and the postfix group can), and off
    loopback other hosts too. libmilter takes any client, the policy service any client
    of CALLAHEAD_POLICY_CLIENTS, and the client address the dictionary guard counts is
    the requester's word; on an unprivileged port, a local user can also bind it while
    callahead is not listening, and Postfix then talks to that program instead."""
    listens = []
    if config.socket:
        listens.append(("CALLAHEAD_SOCKET", parse_listen("CALLAHEAD_SOCKET", config.socket)))
    if config.policy_listen is not None:
        listens.append(("CALLAHEAD_POLICY_LISTEN", config.policy_listen))
    warnings = []
    for variable, listen in listens:
        exposure = tcp_exposure(variable, listen)
        if exposure is not None:
            warnings.append("; ".join(exposure))
    return warnings
