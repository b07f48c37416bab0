"""The `token-broker` command: run the daemon, ask it for tokens, check a configuration.

Only this module calls `sys.exit` (through `main`'s return value), with these codes.

`probe` runs every few seconds in every pod: `main` hands it to `broker.probe` before
anything but the standard library is imported, so every other import of the broker and
of its libraries is made inside the command that needs it (a test holds it so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker import __version__, probe

if TYPE_CHECKING:
    from broker.oneshot import Report

EXIT_OK = 0
EXIT_FAILURE = 1  # the broker refused, failed, or could not be reached; a service failed
EXIT_CONFIG = 2  # the configuration or the command line is wrong

_DESCRIPTION = """\
Keeps Azure ML credentials fresh (v1 web services, v2 online endpoints, Entra scopes)
and serves them to local programs over a Unix socket and loopback HTTP: as tokens, in
files, or added to scoring requests forwarded through /v1/proxy/.

quick start, with no Azure account:  token-broker demo
"""


def _parser() -> argparse.ArgumentParser:
    from broker.config import DEFAULT_CONFIG_PATH
    from broker.oneshot import DEFAULT_TIMEOUT_S

    parser = argparse.ArgumentParser(
        prog="token-broker",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"token-broker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config_help = f"configuration file (default {DEFAULT_CONFIG_PATH}, or $TOKEN_BROKER_CONFIG)"
    run = sub.add_parser(
        "run",
        help="run the daemon until SIGTERM or SIGINT",
        description="Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the "
        "configuration. Under systemd it reports readiness and status (Type=notify). "
        "It runs on uvloop when that is installed (the `fast` extra); set "
        "TOKEN_BROKER_UVLOOP=0 to keep asyncio's own event loop.",
    )
    run.add_argument("-c", "--config", type=Path, help=config_help)

    once = sub.add_parser(
        "once",
        help="fetch every service once, write its sink files, run their commands, and exit",
        description="Sign in, fetch every service (or those named), write their "
        "[service.sink] files and run their commands, print a summary, and exit: 0 when "
        "every service succeeded, 1 when one failed (each with its reason), 2 for a bad "
        "configuration. It never listens. For init containers, CI jobs and cron. Failures "
        "a retry can heal are retried on [refresh]'s backoff, within the call budget, "
        "until --timeout; sign-in refusals, missing roles and unknown services fail at "
        "once. With [cache] on, still-valid credentials are taken from the cache.",
    )
    once.add_argument("-c", "--config", type=Path, help=config_help)
    once.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME",
        help="fetch only this service (repeat for more; default: every service)",
    )
    once.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"give up on what is not fetched after S seconds (default {DEFAULT_TIMEOUT_S:g}); "
        "sink commands of what was fetched still run, each to its command_timeout_s",
    )
    once.add_argument(
        "--json", action="store_true", help="print the summary as JSON (README: One-shot runs)"
    )

    check = sub.add_parser(
        "check-config",
        help="validate a configuration and print it with secrets masked (exit 2 if invalid)",
    )
    check.add_argument("-c", "--config", type=Path, help=config_help)

    token = sub.add_parser("token", help="print a service's credential from a running broker")
    token.add_argument("service", help="the service's name in the configuration")
    token.add_argument(
        "--header", action="store_true", help="print the bare 'Bearer …' header value"
    )
    _client_options(token)

    status = sub.add_parser("status", help="a table of services and their states")
    status.add_argument("--json", action="store_true", help="print the raw JSON instead")
    _client_options(status)

    sub.add_parser(
        "probe",
        help="exit 0 if a running broker is alive (probe live) or ready (probe ready), else 1",
        add_help=False,  # `main` hands `probe` to broker.probe, which has its own options
    )

    sub.add_parser(
        "emulator",
        help="serve the built-in emulator of Entra ID and Azure ML (see: emulator --help)",
        add_help=False,
    )

    rotate = sub.add_parser(
        "keys",
        help="rotate a key service's key with no gap (on the socket, as root or the broker's user)",
    )
    rotate.add_argument("action", choices=["rotate"], help="rotate: regenerate one key")
    rotate.add_argument("service", help="the key service's name in the configuration")
    rotate.add_argument(
        "--key",
        choices=["primary", "secondary"],
        default="primary",
        help="which key Azure regenerates (default primary); the other is served meanwhile",
    )
    _client_options(rotate)

    keys = sub.add_parser(
        "api-key",
        help="create a local API key for TCP clients (prints the key once, and its digest)",
    )
    keys.add_argument("action", choices=["new"], help="new: make a key")
    keys.add_argument(
        "name", type=_key_name, help="the key's name, used in [api_key.NAME] and in logs"
    )

    demo = sub.add_parser("demo", help="emulator + broker + a client, end to end, no Azure account")
    demo.add_argument(
        "--lifetime", type=float, default=12.0, help="token lifetime in seconds (default 12)"
    )
    return parser


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError("give a number of seconds above 0")
    return seconds


def _key_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise argparse.ArgumentTypeError("use 1 to 64 letters, digits, '.', '_' or '-'")
    return value


def _client_options(parser: argparse.ArgumentParser) -> None:
    from broker.config import DEFAULT_SOCKET_PATH

    parser.add_argument(
        "--api-key",
        default=os.environ.get("TOKEN_BROKER_API_KEY"),
        help="local API key for a key-protected service over TCP (default $TOKEN_BROKER_API_KEY)",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=Path(os.environ.get("TOKEN_BROKER_SOCKET", DEFAULT_SOCKET_PATH)),
        help="the broker's Unix socket (default $TOKEN_BROKER_SOCKET or %(default)s)",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("TOKEN_BROKER_URL"),
        help="the broker's loopback URL instead, e.g. http://127.0.0.1:8765",
    )


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["probe"]:
        return probe.main(arguments[1:])
    from broker.errors import ConfigError

    parser = _parser()
    args, extra = parser.parse_known_args(arguments)
    if args.command == "emulator":
        args.options = extra  # the emulator parses its own options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    command = args.command.replace("-", "_")
    handler = globals()[f"_cmd_{command}"]
    try:
        code: int = handler(args)
    except ConfigError as exc:
        print(f"token-broker: invalid configuration\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return code


def _config_path(args: argparse.Namespace) -> Path:
    from broker.config import DEFAULT_CONFIG_PATH

    if args.config is not None:
        return Path(args.config)
    return Path(os.environ.get("TOKEN_BROKER_CONFIG", DEFAULT_CONFIG_PATH))


def _run_daemon(main: Coroutine[Any, Any, None]) -> None:
    """Run the daemon on uvloop when it is installed (the `fast` extra) and not turned off
    with TOKEN_BROKER_UVLOOP=0: the same daemon, a cheaper event loop (about a tenth less
    CPU per request in docs/benchmarks.md)."""
    import asyncio

    if os.environ.get("TOKEN_BROKER_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main)
            return
    asyncio.run(main)


def _cmd_run(args: argparse.Namespace) -> int:
    from broker import log
    from broker.config import load_config
    from broker.errors import BrokerError
    from broker.process import serve

    config = load_config(_config_path(args))
    log.configure(config.log.format, config.log.level)
    try:
        _run_daemon(serve(config))
    except BrokerError as exc:
        log.get_logger("broker.cli").error("broker.start_failed", error=str(exc))
        print(f"token-broker: {log.scrub(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _cmd_once(args: argparse.Namespace) -> int:
    import asyncio

    from broker import log
    from broker.config import load_config
    from broker.oneshot import run_once, select
    from broker.process import disable_core_dumps

    config = load_config(_config_path(args))
    select(config, args.service)  # an unknown name is a configuration error, before anything
    log.configure(config.log.format, config.log.level)
    disable_core_dumps()
    with asyncio.Runner() as runner:
        report = runner.run(run_once(config, args.service, timeout_s=args.timeout))
        code = _print_report(report, as_json=args.json)
        if report.timed_out:
            # A sign-in cut at the deadline may still hold one of MSAL's worker threads,
            # which nothing can cancel, and the interpreter would wait for it at exit: the
            # run is over and reported, so leave without it, at --timeout.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _print_report(report: Report, *, as_json: bool) -> int:
    from broker.oneshot import as_json as report_json
    from broker.oneshot import as_text

    print(json.dumps(report_json(report), indent=2) if as_json else as_text(report))
    if report.ok:
        return EXIT_OK
    failed = ", ".join(outcome.service for outcome in report.failed)
    print(
        f"token-broker: {len(report.failed)} of {len(report.outcomes)} services failed: {failed}",
        file=sys.stderr,
    )
    return EXIT_FAILURE


def _cmd_check_config(args: argparse.Namespace) -> int:
    from broker.config import load_config, render_effective

    config = load_config(_config_path(args))
    print(render_effective(config), end="")
    print(
        f"# {config.path}: valid — {len(config.identities)} identities, "
        f"{len(config.services)} services",
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_token(args: argparse.Namespace) -> int:
    import asyncio

    path = f"/v1/token/{args.service}" + ("?format=header" if args.header else "")
    status, body = asyncio.run(_get(args, path))
    if status != 200:
        return _refused(body)
    if args.header:
        print(body.decode().rstrip("\n"))
    else:
        print(body.decode())
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    status, body = asyncio.run(_get(args, "/v1/services"))
    if status != 200:
        return _refused(body)
    answer = json.loads(body)
    services = answer["services"]
    if args.json:
        print(json.dumps(services, indent=2))
        return EXIT_OK
    print(_table(services))
    if answer.get("fleet", "off") != "off":
        print(f"\nfleet: {answer['fleet']}")
    return EXIT_OK


def _table(services: list[dict[str, Any]]) -> str:
    columns = ("service", "state", "auth", "source", "expires_on", "refresh_by", "failures")
    rows = [[str(s.get(c) if s.get(c) is not None else "-") for c in columns] for s in services]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    errors = [f"{s['service']}: {s['last_error']['message']}" for s in services if s["last_error"]]
    return "\n".join([*lines, "", *errors] if errors else lines)


def _refused(body: bytes) -> int:
    try:
        message = json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:200]
    print(f"token-broker: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _cmd_keys(args: argparse.Namespace) -> int:
    import asyncio

    path = f"/v1/services/{args.service}/keys/rotate?key={args.key}"
    print(f"rotating the {args.key} key of {args.service}; this waits for Azure…", file=sys.stderr)
    status, body = asyncio.run(_get(args, path, method="POST", timeout_s=900))
    if status != 200:
        return _refused(body)
    result = json.loads(body)
    print(f"rotated the {args.key} key of {args.service}; state {result['state']}")
    return EXIT_OK


async def _get(
    args: argparse.Namespace, path: str, *, method: str = "GET", timeout_s: float = 60
) -> tuple[int, bytes]:
    import aiohttp

    from broker.server.access_rules import API_KEY_HEADER

    if args.url:
        connector: aiohttp.BaseConnector = aiohttp.TCPConnector()
        base = args.url.rstrip("/")
    else:
        connector = aiohttp.UnixConnector(path=str(args.socket))
        base = "http://localhost"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"Metadata": "true"}
    if args.api_key:
        headers[API_KEY_HEADER] = args.api_key
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, base + path, headers=headers) as resp,
        ):
            return resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        where = args.url or args.socket
        detail = json.dumps(
            {"message": f"cannot reach the broker at {where}: {exc}; is it running?"}
        )
        return 0, detail.encode()


def _emulator_missing(command: str) -> bool:
    """The emulator is an optional part (its TLS needs trustme): say how to get it."""
    try:
        import trustme  # noqa: F401
    except ImportError:
        print(
            f"token-broker: `{command}` needs the emulator, an optional part that is not "
            "installed; install it with: pip install 'token-broker[emulator]'",
            file=sys.stderr,
        )
        return True
    return False


def _cmd_emulator(args: argparse.Namespace) -> int:
    if _emulator_missing("token-broker emulator"):
        return EXIT_FAILURE
    from broker.emulator.__main__ import main as emulator_main

    try:
        return emulator_main(args.options, prog="token-broker emulator")
    except OSError as exc:
        print(f"token-broker: cannot start the emulator: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE


def _cmd_api_key(args: argparse.Namespace) -> int:
    from broker.config import hash_api_key, new_api_key
    from broker.server.access_rules import API_KEY_HEADER

    key = new_api_key()
    print(
        f"""\
# The key — give it to the client, who sends it as '{API_KEY_HEADER}: <key>'.
# It is shown once and stored nowhere; the broker keeps only its SHA-256 digest.
{key}

# Add to broker.toml, then list "{args.name}" in the service's api_keys and reload:
[api_key.{args.name}]
sha256 = "{hash_api_key(key)}"
"""
    )
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    if _emulator_missing("token-broker demo"):
        return EXIT_FAILURE
    import asyncio

    from broker.demo import run_demo

    return EXIT_OK if asyncio.run(run_demo(lifetime_s=args.lifetime)) else EXIT_FAILURE
