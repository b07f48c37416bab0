"""`python -m broker.emulator`: serve the demo cloud until SIGINT or SIGTERM.

Prints the base URL, the CA file to trust and the `[cloud]` table to paste into
broker.toml.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from pathlib import Path

from broker.emulator import seed
from broker.emulator.server import Emulator, run_emulator
from broker.emulator.state import EmulatorState


def main(argv: Sequence[str] | None = None, prog: str = "python -m broker.emulator") -> int:
    args = _parser(prog).parse_args(argv)
    state = seed.demo_state(
        token_lifetime_s=args.token_lifetime, refresh_after_s=args.refresh_after
    )
    asyncio.run(_serve(args.host, args.port, args.ca_dir, state))
    return 0


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a fake Entra ID + Azure ML (the demo cloud) over HTTPS.",
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
    return parser


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
    print("\n# paste into broker.toml:")
    print(emulator.cloud_profile_toml())
    print(f"# demo tenant_id = {seed.TENANT_ID}")
    print(f"# demo client_id = {seed.CLIENT_ID}, client secret: {seed.CLIENT_SECRET!r}")
    print(
        f"# demo workspace: subscription {seed.SUBSCRIPTION_ID}, resource group "
        f"{seed.RESOURCE_GROUP}, workspace {seed.WORKSPACE} ({seed.REGION}); "
        f"web services {seed.TOKEN_SERVICE} (token), {seed.KEY_SERVICE} (key)",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
