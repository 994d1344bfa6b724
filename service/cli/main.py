"""The `poold` command line: `serve`, `check-config` and the client commands.

Only the standard library is imported at module level, so client commands
start fast; the daemon (aiohttp, uvloop) is imported by `serve` alone, and
the HTTP client and tqdm by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8321"

# serve flag -> configuration key it overrides
_SERVE_FLAGS = {"host": "server.host", "port": "server.port", "workers": "pool.workers",
                "store": "store.path", "log_level": "log.level"}


def parse_arg(text: str) -> Any:
    """One positional job argument: JSON where it parses, else the string itself.

    NaN and Infinity are not JSON a daemon accepts, so they stay strings.
    """
    def no_constant(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(text, parse_constant=no_constant)
    except ValueError:
        return text


def _kwargs_json(text: str) -> dict[str, Any]:
    """`--kwargs`: must be a JSON object (argparse turns the ValueError into exit 2)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"k\": 1}'")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _client_options() -> argparse.ArgumentParser:
    """The options every client command shares (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    g.add_argument("--url", default=os.environ.get("POOLD_URL") or DEFAULT_URL,
                   help="daemon address (default: $POOLD_URL or %(default)s)")
    g.add_argument("--token", default=os.environ.get("POOLD_TOKEN") or None,
                   help="bearer token (default: $POOLD_TOKEN)")
    g.add_argument("--json", action="store_true", help="print the raw JSON answer")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; options follow their subcommand."""
    from service import __version__

    parser = argparse.ArgumentParser(
        prog="poold", description="Run CPU-bound Python functions on all the cores of one host.")
    parser.add_argument("--version", action="version", version=f"poold {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground",
                       description="Run the daemon until SIGTERM or SIGINT. Without --config, "
                                   "$POOLD_CONFIG is read if set, else the built-in defaults apply.")
    p.add_argument("--config", metavar="PATH", help="TOML configuration file")
    p.add_argument("--host", help="overrides server.host")
    p.add_argument("--port", type=int, help="overrides server.port")
    p.add_argument("--workers", type=int, help="overrides pool.workers (0 = one per CPU)")
    p.add_argument("--store", metavar="PATH|URL",
                   help="overrides store.path, or store.url for a postgresql:// URL")
    p.add_argument("--log-level", help="overrides log.level (debug, info, warning, error)")

    p = sub.add_parser("check-config", help="validate a configuration file",
                       description="Validate a configuration file with the environment's "
                                   "POOLD_<SECTION>_<KEY> overrides applied, as serve would.")
    p.add_argument("path", metavar="PATH")

    common = [_client_options()]
    p = sub.add_parser("submit", parents=common, help="submit a job",
                       description="Submit one job. Each ARG is parsed as JSON, and taken as a "
                                   "string where it is not valid JSON.")
    p.add_argument("fn", metavar="FN", help="the function, as module:name")
    p.add_argument("args", metavar="ARG", nargs="*", type=parse_arg, help="positional argument")
    p.add_argument("--kwargs", type=_kwargs_json, metavar="JSON", help="keyword arguments (a JSON object)")
    p.add_argument("--timeout", type=float, metavar="S", help="the job's timeout in seconds")
    p.add_argument("--priority", type=int, default=0, metavar="N", help="higher runs first (default 0)")
    p.add_argument("--retries", type=int, default=0, metavar="N", help="attempts after a failure (default 0)")
    p.add_argument("--key", metavar="K", help="idempotency key: resubmitting it returns the same job")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job and print its result (exit 1 if it did not succeed)")

    p = sub.add_parser("status", parents=common, help="show a job")
    p.add_argument("id", metavar="ID")
    p.add_argument("--wait", type=_non_negative, metavar="S",
                   help="wait up to S seconds for the job to finish (exit 0 only if it succeeded)")

    p = sub.add_parser("cancel", parents=common, help="cancel a queued or running job")
    p.add_argument("id", metavar="ID")

    p = sub.add_parser("jobs", parents=common, help="list jobs, newest first")
    p.add_argument("--state", choices=("queued", "running", "succeeded", "failed", "timed_out", "cancelled"))
    p.add_argument("--limit", type=int, default=100, metavar="N", help="at most N jobs (1-1000, default 100)")

    sub.add_parser("workers", parents=common, help="list the worker processes")
    sub.add_parser("health", parents=common, help="exit 0 when the daemon is healthy")
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    """Loads the configuration (exit 2 when invalid), then runs the daemon."""
    import signal
    import threading

    # a SIGTERM/SIGINT before the event loop takes over is noted, not fatal: the daemon then
    # starts and stops cleanly at once (exit 0), as it would a moment later; a SIGHUP then is
    # ignored (the configuration is being read anyway), not the end of the daemon
    early: list[int] = []
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda signum, _frame: early.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return _serve(args, early)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(args: argparse.Namespace, early: list[int]) -> int:
    from service.config import ConfigError, load

    path = args.config if args.config is not None else (os.environ.get("POOLD_CONFIG") or None)
    flags = {key: getattr(args, name) for name, key in _SERVE_FLAGS.items()}
    try:
        cfg = load(path, os.environ, flags)
    except ConfigError as err:
        print(f"poold: invalid configuration: {err}", file=sys.stderr)
        return 2
    from service.daemon.main import run  # heavy (aiohttp, uvloop): only for serve

    return run(cfg, early)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validates a file as `serve` would read it; the error names file or variable and key."""
    from service.config import ConfigError, load

    try:
        load(args.path, os.environ)
    except ConfigError as err:
        print(f"poold: invalid configuration: {err}", file=sys.stderr)
        return 2
    print(f"{args.path}: ok")
    return 0


def _client_command(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler of a client command, imported only when one runs."""
    def run(args: argparse.Namespace) -> int:
        from service.cli import commands as cli_client

        return cli_client.run(name, args)

    return run


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": cmd_serve,
    "check-config": cmd_check_config,
    **{n: _client_command(n) for n in ("submit", "status", "cancel", "jobs", "workers", "health")},
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `poold` and `python -m service`; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help/--version (0) end here
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("poold: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `poold jobs | head`: not an error worth a traceback
        # the interpreter flushes stdout at exit: point it somewhere that cannot break
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
