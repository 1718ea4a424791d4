"""What ``serve`` checks of its configuration before it listens, and ``doctor`` reports
too: an answer Postfix would give up on, an EHLO name primaries refuse, a milter socket
off loopback."""

from __future__ import annotations

from ..probing.loop import HANDOFF_MARGIN
from .assembly import answer_time, engine_settings, route_wait, shared_delay
from .config import Config
from .endpoints import loopback_host, parse_listen
from .postfixconf import is_fully_qualified, postfix_milter_command_timeout


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
        " (+ CALLAHEAD_REDIS_LOCK_WAIT and 3 CALLAHEAD_REDIS_TIMEOUT)" if config.redis_url else ""
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


def milter_exposure_warning(config: Config) -> str | None:
    """A warning for an ``inet:`` milter socket reachable from other hosts: libmilter
    takes any client, and ``{client_addr}`` (the dictionary guard's key) is the
    requester's word there too; None on loopback, a unix socket, or no milter."""
    if not config.socket:
        return None
    listen = parse_listen("CALLAHEAD_SOCKET", config.socket)
    if listen.kind != "inet" or loopback_host(listen.host):
        return None
    return (
        f"CALLAHEAD_SOCKET={config.socket} listens off loopback: anyone who reaches it can "
        "ask which addresses exist, and name the client address the dictionary guard "
        "counts; listen on 127.0.0.1 or a unix socket, or firewall the port to the "
        "Postfix hosts"
    )
