"""The command line: ``callahead serve``, ``probe ADDRESS`` (probecmd.py), ``config``,
``cache ...``, ``status`` (these two ask a running ``serve`` over the admin socket,
admin.py), ``report`` (reportcmd.py) and ``doctor`` (doctor/)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from .. import __version__
from ..frontends.adminclient import AdminUnavailable, ask, status_lines
from ..probing.loop import loop_problem
from . import logoutput
from .config import EX_CONFIG, Config, ConfigError, load_config
from .doctor.checkup import (
    DoctorUsageError,
    EnvFileError,
    doctor_environment,
    known_addresses,
    read_env_file,
    run_doctor,
)
from .probecmd import EX_USAGE, no_routes, routes_source, run_probe
from .reportcmd import add_report_parser, run_report
from .socketaccess import postfix_socket_problems
from .startchecks import answer_time_problem, exposure_warnings, helo_warning
from .variables import VARIABLES

EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_NOPERM = 77

log = logging.getLogger("callahead")


def variables_help() -> str:
    width = max(len(v.name) for v in VARIABLES)
    lines = ["environment variables (default in brackets):"]
    for v in VARIABLES:
        default = v.shown_default or "empty"
        lines.append(f"  {v.name:<{width}}  {v.meaning} [{default}]")
    return "\n".join(lines)


def _env_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--env-file",
        metavar="FILE",
        help="read the variables from FILE as the unit does (NAME=value lines, e.g. "
        "/etc/default/callahead; a value may hold spaces), over the environment",
    )


def build_parser() -> argparse.ArgumentParser:
    common = {
        "epilog": variables_help(),
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    parser = argparse.ArgumentParser(
        prog="callahead",
        description="Recipient-verification milter for a Postfix backup MX: probes the "
        "primary for every RCPT TO and rejects unknown recipients with 550.",
        **common,  # type: ignore[arg-type]
    )
    parser.add_argument("--version", action="version", version=f"callahead {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "serve",
        help="run the milter in the foreground",
        description="Run the milter in the foreground until SIGTERM or SIGINT.",
        **common,  # type: ignore[arg-type]
    )
    probe = sub.add_parser(
        "probe",
        help="probe the primary for one address",
        description="Probe the primary for one address, with the same configuration and "
        "no cache. Exit 0 valid, 1 unknown, 2 tempfail, 64 usage error, 78 bad config.",
        **common,  # type: ignore[arg-type]
    )
    probe.add_argument("address", metavar="ADDRESS", help="recipient, e.g. user@example.com")
    probe.add_argument(
        "--explain",
        action="store_true",
        help="print the MX targets never probed, the SMTP transcript, the line that "
        "decided and why it was classified so",
    )
    _env_file_option(probe)
    config = sub.add_parser(
        "config",
        help="print the effective configuration",
        description="Print the effective configuration; exit 78 if a value is bad.",
        **common,  # type: ignore[arg-type]
    )
    _env_file_option(config)
    cache = sub.add_parser(
        "cache",
        help="show or flush entries of a running serve's positive cache",
        description="Talk to the running serve over CALLAHEAD_ADMIN_SOCKET. Exit 69 when "
        "no serve answers there.",
        **common,  # type: ignore[arg-type]
    )
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    show = cache_sub.add_parser(
        "show",
        help="is ADDRESS cached, and for how long (exit 0 cached, 1 not)",
        description="Exit 0 when ADDRESS is cached (with the seconds it has left), 1 when not.",
    )
    show.add_argument("address", metavar="ADDRESS")
    flush = cache_sub.add_parser(
        "flush",
        help="forget ADDRESS, every address @DOMAIN, or --all; prints how many went",
        description="Forget cached entries: the next recipient is probed again.",
    )
    what = flush.add_mutually_exclusive_group(required=True)
    what.add_argument("target", nargs="?", metavar="ADDRESS|@DOMAIN")
    what.add_argument("--all", action="store_true", help="forget every entry")
    cache_sub.add_parser("stats", help="entries, size, TTL, hits, misses and refreshes")
    doctor = sub.add_parser(
        "doctor",
        help="check a live installation item by item (exit 0 all pass, 1 one failed)",
        description="Check the backup's Postfix, the sockets, the routes and every primary, "
        "each failed item with its fix. Exit 0 when all pass, 1 when one fails, 78 bad "
        "config. Reads the unit's /etc/default/callahead over the environment.",
        **common,  # type: ignore[arg-type]
    )
    doctor.add_argument(
        "--known",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a real user of a relay domain, probed as valid (default: one the running "
        "serve verified, else postmaster@); repeat for more domains",
    )
    doctor.add_argument(
        "--postfix",
        metavar="DIR",
        help="the backup's Postfix configuration directory (default: MAIL_CONFIG, else "
        "/etc/postfix)",
    )
    doctor.add_argument(
        "--env-file",
        metavar="FILE",
        help="callahead's environment file (default /etc/default/callahead when it "
        "exists, over the unit's own Environment= such as an upgrade's drop-in; "
        "given: that file alone over the shell's environment; empty: none)",
    )
    sub.add_parser(
        "status",
        help="is the running serve healthy (exit 0 healthy, 1 degraded, 69 not running)",
        description="The probe loop and, per primary, breaker, pool sessions and last probe. "
        "Exit 0 healthy, 1 degraded, 69 not running.",
        **common,  # type: ignore[arg-type]
    )
    add_report_parser(sub, common)
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command: str = args.command
    environment = os.environ if env is None else env
    try:
        if command == "doctor":
            environment = doctor_environment(environment, args.env_file)
            known = known_addresses(args.known)
        elif command in ("config", "probe") and args.env_file:
            environment = {**environment, **read_env_file(args.env_file)}
        config = load_config(environment)
    except (ConfigError, EnvFileError) as exc:
        print(f"callahead: {exc}", file=sys.stderr)
        return EX_CONFIG
    except DoctorUsageError as exc:
        print(f"callahead: {exc}", file=sys.stderr)
        return EX_USAGE
    if command == "config":
        for name, value in config.describe():
            print(f"{name}={value}")
        print(f"# routes from: {routes_source(config)}")
        if config.redis_refused:
            name = config.redis_shown.partition("=")[0]
            print(f"# shared cache: off, {name} is not used: {config.redis_refused}")
        return 0
    if command == "probe":
        return run_probe(config, args.address, explain=args.explain)
    if command == "cache":
        return run_cache(config, args)
    if command == "status":
        return run_status(config)
    if command == "report":
        return run_report(config, args)
    if command == "doctor":
        return run_doctor(config, args.postfix, known)
    return run_serve(config)


def _ask(config: Config, request: dict[str, object]) -> dict[str, object] | int:
    """The answer of the running serve, or the exit status when there is none."""
    if not config.admin_socket:
        print("callahead: CALLAHEAD_ADMIN_SOCKET is empty: no admin socket", file=sys.stderr)
        return EX_UNAVAILABLE
    try:
        answer = ask(config.admin_socket, request)
    except AdminUnavailable as exc:
        print(f"callahead: {exc}", file=sys.stderr)
        return EX_NOPERM if exc.permission else EX_UNAVAILABLE
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else answer
        print(f"callahead: serve refused the request: {error}", file=sys.stderr)
        return EX_USAGE
    return answer


def run_cache(config: Config, args: argparse.Namespace) -> int:
    action: str = args.cache_command
    request: dict[str, object]
    if action == "show":
        request = {"op": "cache-show", "address": args.address}
    elif action == "flush":
        target: str | None = args.target
        if args.all:
            request = {"op": "cache-flush", "all": True}
        elif target is not None and target.startswith("@"):
            request = {"op": "cache-flush", "domain": target[1:]}
        else:
            request = {"op": "cache-flush", "address": target}
    else:
        request = {"op": "cache-stats"}
    answer = _ask(config, request)
    if isinstance(answer, int):
        return answer
    if action == "show":
        if not answer["cached"]:
            print(f"{answer['address']}: not cached")
            return 1
        print(f"{answer['address']}: cached, {answer['remaining']:.0f} s left{_where(answer)}")
        return 0
    if action == "flush":
        flushed = answer["flushed"]
        print(f"flushed {flushed} entr{'y' if flushed == 1 else 'ies'}{_where(answer)}")
        if answer.get("saved") is False:
            print(
                "callahead: warning: the cache file could not be saved (see serve's log): "
                "a restart before its next save brings the flushed entries back",
                file=sys.stderr,
            )
        return 0
    for key, value in answer.items():
        if key != "ok":
            print(f"{key}: {_plain(value)}")
    return 0


def _where(answer: dict[str, object]) -> str:
    """Which cache a show or flush answer is about, when Redis is configured."""
    if "shared" not in answer:
        return ""
    if answer["shared"]:
        return " (shared: every backup)"
    return " (this backup only: redis did not answer)"


def _plain(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _fmt(value)
    return str(value)


def _fmt(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.3f}"


def run_status(config: Config) -> int:
    answer = _ask(config, {"op": "status"})
    if isinstance(answer, int):
        return answer
    for line in status_lines(answer):
        print(line)
    return 0 if answer["healthy"] else 1


def run_serve(config: Config) -> int:
    if no_routes(config):
        print(
            "callahead: CALLAHEAD_ROUTES='' is invalid: serve needs at least one "
            "domain=nexthop route, or CALLAHEAD_POSTFIX_CONFIG",
            file=sys.stderr,
        )
        return EX_CONFIG
    if not config.socket and config.policy_listen is None:
        print(
            "callahead: CALLAHEAD_SOCKET and CALLAHEAD_POLICY_LISTEN are both empty: serve "
            "needs a milter, a policy service, or both",
            file=sys.stderr,
        )
        return EX_CONFIG
    problem = loop_problem(config.event_loop)
    if problem:
        print(f"callahead: {problem}", file=sys.stderr)
        return EX_CONFIG
    logoutput.configure(config.log_level, sys.stderr)
    for warning in (helo_warning(config.helo_name), *exposure_warnings(config)):
        if warning:
            log.warning("%s", warning)
    problem = answer_time_problem(config) if config.socket else None
    if problem:
        print(f"callahead: {problem}", file=sys.stderr)
        return EX_CONFIG
    # A unix socket Postfix cannot connect to would let mail through unverified.
    unreachable = postfix_socket_problems(config)
    for problem in unreachable:
        print(f"callahead: {problem}", file=sys.stderr)
    if unreachable:
        return EX_CONFIG
    # Imported here: pymilter loads libmilter, which `config` and `probe` do not need.
    from .server import serve

    return serve(config)
