"""`python -m broker.emulator`: serve the demo cloud until SIGINT or SIGTERM.

Prints the base URL, the CA file to trust, the faults armed from the command line and the
`[cloud]` table to paste into broker.toml. `token-broker emulator` forwards its arguments
here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import textwrap
from collections.abc import Sequence
from pathlib import Path

from broker.emulator import seed
from broker.emulator.fault_specs import parse_fault, parse_outage
from broker.emulator.faults import ROUTES, Fault, Outage
from broker.emulator.records import PLACEMENTS
from broker.emulator.server import Emulator, run_emulator
from broker.emulator.state import EmulatorState

EPILOG = f"""\
fault SPECs (--fault ROUTE=SPEC[@SERVICE], repeatable, applied in order):
  STATUS                    answer STATUS with Azure's error body, e.g. mms.token=503
  STATUS:retry-after=SECS   the same with a Retry-After header, e.g. mms.token=429:retry-after=5
  reset                     read the request, then reset the TCP connection (no answer)
  hang                      never answer (until the client gives up or the emulator stops)
  malformed                 200 with an HTML body labelled application/json
  partial                   200 with the real JSON answer cut in half
  cut                       the real answer's headers, half its body, then the connection closed
  missing_fields            200 with the real answer minus its essential fields
  slow:SECS                 the real answer, SECS seconds late
  @SERVICE                  (suffix) only for that web service, e.g. mms.token=503@fraud-aks
{textwrap.fill("routes: " + ", ".join(ROUTES), width=88, subsequent_indent="  ")}

--region-down REGION[=HOW] fails every request under /regions/REGION/ (discovery, MMS,
scoring): HOW is reset (default), hang, malformed or a status code; Entra ID and ARM stay up.
"""


def main(argv: Sequence[str] | None = None, prog: str = "python -m broker.emulator") -> int:
    args = parser(prog).parse_args(argv)
    asyncio.run(_serve(args.host, args.port, args.ca_dir, build_state(args)))
    return 0


def build_state(args: argparse.Namespace) -> EmulatorState:
    """The demo cloud with the command line's lifetimes, faults and dark regions."""
    state = seed.demo_state(
        token_lifetime_s=args.token_lifetime,
        refresh_after_s=args.refresh_after,
        refresh_placement=args.refresh_after_placement,
    )
    for fault in args.fault:
        state.faults.add(fault)
    for outage in args.region_down:
        state.faults.darken(outage)
    return state


def parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a fake Entra ID + Azure ML (the demo cloud) over HTTPS.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=8443, help="port, 0 for any (default: %(default)s)"
    )
    parser.add_argument("--ca-dir", type=Path, default=None, help="where to write emulator-ca.pem")
    parser.add_argument(
        "--token-lifetime", type=float, default=20.0, help="fraud-aks token life, s"
    )
    parser.add_argument(
        "--refresh-after", type=float, default=8.0, help="fraud-aks refreshAfter, s"
    )
    _fault_options(parser)
    return parser


def _fault_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fault",
        type=_fault_option,
        action="append",
        default=[],
        metavar="ROUTE=SPEC[@SERVICE]",
        help="make ROUTE fail as SPEC says (repeatable; SPECs below)",
    )
    parser.add_argument(
        "--region-down",
        type=_outage_option,
        action="append",
        default=[],
        metavar="REGION[=HOW]",
        help="take REGION down: its discovery, MMS and scoring fail as HOW says "
        "(reset, hang, malformed or a status; default reset; repeatable)",
    )
    parser.add_argument(
        "--refresh-after-placement",
        choices=PLACEMENTS,
        default="normal",
        help="where fraud-aks tokens put refreshAfter: issue + --refresh-after (normal), "
        "before issue (past), after expiryOn (after_expiry) or nowhere (absent); "
        "default: %(default)s",
    )


def _fault_option(text: str) -> Fault:
    try:
        return parse_fault(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _outage_option(text: str) -> Outage:
    try:
        return parse_outage(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def _serve(host: str, port: int, ca_dir: Path | None, state: EmulatorState) -> None:
    task = asyncio.create_task(run_emulator(host, port, ca_dir, state, ready_callback=_announce))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    await asyncio.wait({task})
    if not task.cancelled():
        task.result()
    print("emulator stopped", flush=True)


def _announce(emulator: Emulator) -> None:
    print(f"emulator listening on {emulator.base_url}")
    print(f"CA certificate: {emulator.ca_path}")
    for fault in emulator.state.faults.active():
        print(f"fault armed: {json.dumps(fault.to_json())}")
    for outage in emulator.state.faults.outages():
        print(f"region down: {json.dumps(outage.to_json())}")
    print("\n# paste into broker.toml:")
    print(emulator.cloud_profile_toml())
    print(f"# demo tenant_id = {seed.TENANT_ID}")
    print(f"# demo client_id = {seed.CLIENT_ID}, client secret: {seed.CLIENT_SECRET!r}")
    print(
        f"# demo workspace: subscription {seed.SUBSCRIPTION_ID}, resource group "
        f"{seed.RESOURCE_GROUP}, workspace {seed.WORKSPACE} ({seed.REGION}); "
        f"web services {seed.TOKEN_SERVICE} (token), {seed.KEY_SERVICE} (key); "
        f"online endpoints {seed.ENDPOINT_TOKEN} (AMLToken), {seed.ENDPOINT_KEY} (Key), "
        f"{seed.ENDPOINT_AAD} (AADToken)",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
