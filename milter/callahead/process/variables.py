"""The one table of ``CALLAHEAD_*`` variables: for each, its default, its meaning (which
``--help``, the README and docs/reference.md give), the ``Config`` field it sets and the
``Kind`` of its value (``parsers.Variable``). ``config.load_config`` reads them in this
order.
"""

from __future__ import annotations

from ..base.logfmt import redact_url
from ..core.policy import TempfailAction
from ..probing.loop import LoopKind
from ..smtp.tls import TlsMode
from .endpoints import (
    METRICS,
    MX_NETWORKS,
    NETWORKS,
    OPTIONAL_LISTEN,
    RESOLVER,
    ROUTES,
    SOCKET,
)
from .parsers import (
    ADDRESS,
    CONTROLS,
    LOG_LEVEL,
    MAILLOG,
    PATH,
    REDIS_URL,
    YES_NO,
    Variable,
    choice,
    fmt_number,
    number,
    seconds,
    whole,
)
from .postfixconf import HELO, POSTFIX_CONFIG, POSTFIX_POLICY_MAX_IDLE
from .sentinelconfig import SENTINEL_VARIABLES

SOCKET_DIRECTORY = "/var/spool/postfix/callahead"
"""Where the unix sockets Postfix connects to live: inside Postfix's queue directory, where
a chrooted smtpd finds them (main.cf: ``unix:callahead/milter.sock``), and made by the
package's tmpfiles entry root:postfix 0770, so only root and the postfix group get in."""
DEFAULT_SOCKET = f"unix:{SOCKET_DIRECTORY}/milter.sock"
POLICY_SOCKET = f"unix:{SOCKET_DIRECTORY}/policy.sock"
"""The policy service's documented socket (it is off unless CALLAHEAD_POLICY_LISTEN is set)."""
DEFAULT_METRICS_LISTEN = "127.0.0.1:9895"
DEFAULT_ADMIN_SOCKET = "/run/callahead/admin.sock"
DEFAULT_POLICY_CLIENTS = "127.0.0.0/8 ::1/128"

VARIABLES: tuple[Variable, ...] = (
    Variable(
        "CALLAHEAD_SOCKET",
        DEFAULT_SOCKET,
        "where the milter listens: unix:/path (main.cf names the default "
        "unix:callahead/milter.sock: only root and the postfix group can reach it), or, "
        "when asked for, inet:HOST:PORT or inet:PORT@HOST (a TCP port: every local user "
        "can reach it, a warning at start); empty: no milter (the policy service alone)",
        kind=SOCKET,
    ),
    Variable(
        "CALLAHEAD_POLICY_LISTEN",
        "",
        f"where the Postfix policy service (check_policy_service) listens: unix:/path "
        f"({POLICY_SOCKET}, which main.cf names unix:callahead/policy.sock), or, when "
        "asked for, inet:HOST:PORT or inet:[IPV6]:PORT (a TCP port: every local user can "
        "reach it, a warning at start); empty: no policy service",
        kind=OPTIONAL_LISTEN,
    ),
    Variable(
        "CALLAHEAD_POLICY_CLIENTS",
        DEFAULT_POLICY_CLIENTS,
        "networks whose clients the inet: policy service answers (CIDRs or addresses, "
        "separated by spaces or commas); any other client is disconnected at once "
        "(callahead_policy_refused_connections_total); a policy service listening off "
        "loopback must list its Postfix hosts here (else exit 78)",
        kind=NETWORKS,
    ),
    Variable(
        "CALLAHEAD_POLICY_MAX_CONNECTIONS",
        "200",
        "policy service connections open at once (1-10000; Postfix keeps one per smtpd "
        "process: keep it above smtpd's process limit); a new one beyond it takes the place "
        "of one that never sent a request, else of the one idle longest, and is closed at "
        "once only when every open one is busy",
        kind=whole(1, 10000),
    ),
    Variable(
        "CALLAHEAD_POLICY_MAX_IDLE",
        fmt_number(POSTFIX_POLICY_MAX_IDLE),
        "Postfix's smtpd_policy_service_max_idle: a policy connection idle 5 s longer than "
        "this (one Postfix would have closed) is closed",
        kind=seconds(positive=True, high=86400),
    ),
    Variable(
        "CALLAHEAD_ROUTES",
        "",
        "domain=nexthop entries, separated by spaces or commas; nexthop as in "
        "transport(5): [host] or [host]:port (no MX lookup), host or host:port (MX of "
        "host, then its address), optional smtp:/relay: prefix, smtp: or relay alone "
        "for the MX of the recipient domain; .example.com matches subdomains; a domain "
        "listed twice fails over in order; taken before CALLAHEAD_POSTFIX_CONFIG (serve "
        "and probe need one of the two)",
        kind=ROUTES,
    ),
    Variable(
        "CALLAHEAD_POSTFIX_CONFIG",
        "",
        "a Postfix config directory (e.g. /etc/postfix) whose relay_domains and "
        "transport_maps give the routes, looked up with postconf and postmap (re-read "
        "on SIGHUP); empty: none",
        field="postfix",
        kind=POSTFIX_CONFIG,
    ),
    Variable(
        "CALLAHEAD_RESOLVER",
        "",
        "DNS server for MX routes, HOST[:PORT] (an address); empty: the system's "
        "(/etc/resolv.conf)",
        kind=RESOLVER,
    ),
    Variable(
        "CALLAHEAD_MX_ALLOW_NETWORKS",
        "",
        "loopback or link-local networks (CIDRs or addresses, separated by spaces or "
        "commas) that an address given by an MX lookup may be in and still be probed (a "
        "lab whose primaries run on loopback); any other loopback, link-local, "
        "unspecified (0.0.0.0, ::) or multicast MX address, and this host's own, is "
        "skipped (literal [host] nexthops are never); empty: none",
        kind=MX_NETWORKS,
    ),
    Variable(
        "CALLAHEAD_CACHE_TTL",
        "86400",
        "seconds a positive answer is trusted",
        kind=number(float, what="expected a number of seconds >= 0 (0 disables the cache)"),
    ),
    Variable(
        "CALLAHEAD_CACHE_SIZE",
        "100000",
        "most addresses kept in the positive cache",
        kind=number(int, what="expected a whole number >= 0 (0 disables the cache)"),
    ),
    Variable(
        "CALLAHEAD_CACHE_FILE",
        "",
        "where the positive cache is saved (atomically, at stop and every "
        "CALLAHEAD_CACHE_SAVE_INTERVAL seconds) and loaded at start with each entry's "
        "remaining TTL, so a restart does not probe every address again; a missing or "
        "bad file is logged and ignored; empty: not saved",
        kind=PATH,
    ),
    Variable(
        "CALLAHEAD_CACHE_SAVE_INTERVAL",
        "300",
        "seconds between two saves of CALLAHEAD_CACHE_FILE",
        kind=seconds(positive=True),
    ),
    Variable(
        "CALLAHEAD_CACHE_REFRESH",
        "0.1",
        "last share of the TTL (0-0.9) in which a cached address that is asked for is "
        "verified again in the background, on spare probe slots only: hot addresses "
        "never wait for a probe and users deleted on the primary drop out; 0 disables",
        kind=number(float, maximum=0.9, what="expected a number from 0 to 0.9"),
    ),
    Variable(
        "CALLAHEAD_CATCHALL_CHECK",
        "3600",
        "seconds between two checks (one probe of a made-up address, in the background, "
        "at the first recipient after that time) of whether a routed domain's primary "
        "accepts every address; such a domain's recipients are accepted without a probe "
        "(reason accepts_all); 0 disables",
        kind=seconds(high=604800),
    ),
    Variable(
        "CALLAHEAD_CONTROLS",
        "",
        "addresses known to exist at the primary, separated by spaces or commas (e.g. "
        "abuse@example.com it@example.net), one or more per domain: asked as the "
        "domain's control while callahead has verified none of its users yet, so that a "
        "bare 5xx (no enhanced status code, as Exim sends) is trusted behind a primary "
        "without postmaster@; not postmaster@ itself; empty: none",
        kind=CONTROLS,
    ),
    Variable(
        "CALLAHEAD_MAILLOG",
        "",
        "Postfix's mail log, read for the backscatter meter (what became of each recipient "
        "callahead accepted: callahead_relay_outcomes_total, callahead_backscatter_total): "
        "journal (the systemd journal, needs python3-systemd) or a file's absolute path "
        "(/var/log/mail.log, followed across logrotate); empty: off",
        kind=MAILLOG,
    ),
    Variable(
        "CALLAHEAD_REDIS_URL",
        "",
        "Redis shared by the backup MXes of a site (redis://:PASSWORD@HOST:PORT/DB, a "
        "password required off loopback (without one the URL is not used: each backup goes "
        "on alone, with an error at start); rediss:// for TLS, the host name checked; "
        "unix:///path): positive answers and probes in flight are shared, flushes act on "
        "all; every backup and nothing else may reach it; Redis down or slow: each backup "
        "goes on alone; empty: not shared",
        kind=REDIS_URL,
        secret=redact_url,
    ),
    Variable(
        "CALLAHEAD_REDIS_TIMEOUT",
        "0.2",
        "seconds for one Redis round trip; past it (or on any error) the recipient is "
        "handled as without Redis, and after 3 failures in a row Redis is left alone for 5 s",
        kind=seconds(positive=True, high=5),
    ),
    Variable(
        "CALLAHEAD_REDIS_LOCK_WAIT",
        "2",
        "seconds a backup waits for another backup's probe of the same address before "
        "probing itself",
        kind=seconds(high=60),
    ),
    Variable(
        "CALLAHEAD_REDIS_LOCAL_TTL",
        "60",
        "with Redis, seconds a positive answer is kept in this backup's own cache in front "
        "of Redis (at most CALLAHEAD_CACHE_TTL): how long a flush missed while Redis was "
        "unreachable can go unseen, and how often an address is re-probed while it is",
        kind=seconds(positive=True, high=86400),
    ),
    *SENTINEL_VARIABLES,
    Variable(
        "CALLAHEAD_TEMPFAIL_ACTION",
        "accept",
        "accept or defer, when the probe cannot decide",
        kind=choice(TempfailAction, "expected accept or defer"),
    ),
    Variable(
        "CALLAHEAD_DRY_RUN",
        "no",
        "yes: decide, log and count every recipient as usual, but never reject or defer "
        "(the log line says dry_run=yes and what would have happened)",
        kind=YES_NO,
    ),
    Variable(
        "CALLAHEAD_PROBE_TIMEOUT",
        "10",
        "seconds for a whole probe; keep well below Postfix's milter_command_timeout",
        kind=seconds(positive=True, high=300),
    ),
    Variable(
        "CALLAHEAD_PROBE_SENDER",
        "",
        "MAIL FROM of the probes; empty is <>",
        kind=ADDRESS,
    ),
    Variable(
        "CALLAHEAD_PROBE_FALLBACK_SENDER",
        "",
        "MAIL FROM for one retry when a primary refuses the probe sender (not the "
        "recipient), kept for that primary from then on; empty: no retry",
        kind=ADDRESS,
    ),
    Variable(
        "CALLAHEAD_HELO_NAME",
        "",
        "EHLO name of the probes; the primary must accept it (a name that is not "
        "fully qualified gets a warning at start)",
        kind=HELO,
        shown="(Postfix's myhostname, else this host's FQDN)",
    ),
    Variable(
        "CALLAHEAD_METRICS_LISTEN",
        DEFAULT_METRICS_LISTEN,
        "HOST:PORT of the Prometheus /metrics endpoint; empty disables it",
        kind=METRICS,
    ),
    Variable(
        "CALLAHEAD_ADMIN_SOCKET",
        DEFAULT_ADMIN_SOCKET,
        "unix socket (mode 0600: for root, and the service's own user) where serve "
        "answers callahead cache and callahead status; empty disables it",
        kind=PATH,
    ),
    Variable(
        "CALLAHEAD_LOG_LEVEL",
        "INFO",
        "DEBUG, INFO, WARNING or ERROR (from INFO up, lines are written in batches within "
        "0.2 s, warnings at once; at DEBUG each at once)",
        kind=LOG_LEVEL,
    ),
    Variable(
        "CALLAHEAD_EVENT_LOOP",
        "asyncio",
        "the probe loop's event loop: asyncio (its own) or uvloop (which must then be "
        "installed; measured no faster)",
        kind=choice(LoopKind, "expected asyncio or uvloop"),
    ),
    Variable(
        "CALLAHEAD_PROBE_TLS",
        "may",
        "STARTTLS for probes, as smtp_tls_security_level: none, may (when offered) or "
        "encrypt (required); certificates are not verified",
        kind=choice(TlsMode, "expected none, may or encrypt"),
    ),
    Variable(
        "CALLAHEAD_PROBE_PIPELINING",
        "yes",
        "yes: where the primary offers PIPELINING, send a probe's MAIL FROM and RCPT TO in "
        "one write and let up to 8 concurrent probes share a session (fewer, so that a "
        "refusal of each and of its controls stays within the primary's error limit); "
        "no: one command, "
        "then its reply",
        kind=YES_NO,
    ),
    Variable(
        "CALLAHEAD_POOL_SIZE",
        "4",
        "open probe sessions kept per primary (1-100)",
        kind=whole(1, 100),
    ),
    Variable(
        "CALLAHEAD_POOL_IDLE",
        "30",
        "seconds an idle probe session is kept open; keep below the primary's "
        "smtpd_timeout (300 s in Postfix, 10 s under stress)",
        kind=seconds(positive=True, high=3600),
    ),
    Variable(
        "CALLAHEAD_POOL_MAX_AGE",
        "10",
        "seconds a probe session may live: a primary reads its tables when a session "
        "begins, so this bounds how old a view of a new user a verdict can rest on",
        kind=seconds(positive=True, high=3600),
    ),
    Variable(
        "CALLAHEAD_MAX_PROBES",
        "64",
        "probes in flight at once, all primaries (1-10000)",
        kind=whole(1, 10000),
    ),
    Variable(
        "CALLAHEAD_PROBE_WAIT",
        "2",
        "seconds a recipient may wait for a probe slot before the tempfail action "
        "(reason overload)",
        kind=seconds(high=300),
    ),
    Variable(
        "CALLAHEAD_PRIMARY_RATE",
        "0",
        "probes per second each primary may get from this callahead (a token bucket "
        "holding a second's worth, at least one); a probe over it waits within "
        "CALLAHEAD_PROBE_WAIT, else the tempfail action (reason primary_budget); "
        "0: unlimited",
        kind=number(float, maximum=100_000, what="expected a number from 0 to 100000"),
    ),
    Variable(
        "CALLAHEAD_SITE_PRIMARY_RATE",
        "0",
        "probes per second each primary may get from every backup sharing the Redis "
        "(CALLAHEAD_REDIS_URL), as CALLAHEAD_PRIMARY_RATE is per backup, which stays the "
        "floor while Redis cannot be used; 0: off",
        kind=number(float, maximum=100_000, what="expected a number from 0 to 100000"),
    ),
    Variable(
        "CALLAHEAD_BREAKER_FAILURES",
        "5",
        "consecutive connection-level failures after which a primary is treated as "
        "down (reason primary_down); 0 disables",
        kind=whole(0, 1000),
    ),
    Variable(
        "CALLAHEAD_BREAKER_COOLDOWN",
        "30",
        "seconds a primary treated as down gets no probes; then one trial probe",
        kind=seconds(positive=True, high=3600),
    ),
    Variable(
        "CALLAHEAD_CLIENT_UNKNOWN_LIMIT",
        "20",
        "unknown recipients a client may send per window; past it, uncached recipients "
        "get 450 4.7.1 without a probe (reason client_limit); 0 disables",
        kind=whole(0, 1_000_000),
    ),
    Variable(
        "CALLAHEAD_CLIENT_WINDOW",
        "600",
        "seconds of the sliding window of CALLAHEAD_CLIENT_UNKNOWN_LIMIT; 0 disables",
        kind=seconds(),
    ),
    Variable(
        "CALLAHEAD_CLIENT_IPV6_PREFIX",
        "64",
        "IPv6 clients are counted by network of this many bits (a host often holds a "
        "whole /64); 128 counts each address",
        kind=whole(16, 128),
    ),
)

NAMES = frozenset(v.name for v in VARIABLES)
