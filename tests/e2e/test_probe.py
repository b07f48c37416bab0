"""`token-broker probe live|ready` as a real process, against a live broker (ready and not
ready) on both listeners and against no broker at all; and what it imports."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.cli import main
from broker.config import DEFAULT_SOCKET_PATH
from broker.emulator import Emulator
from broker.emulator import seed as demo
from broker.probe import DEFAULT_SOCKET
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(30)

PROBES = ["live", "ready"]
LISTENERS = ["unix", "tcp"]
# What a probe must never import: it runs every few seconds in every pod.
HEAVY = ("aiohttp", "structlog", "msal", "cryptography", "asyncio", "broker.config", "broker.log")


@dataclass
class Probed:
    code: int
    out: str
    err: str


async def probe(*args: str, env: dict[str, str] | None = None) -> Probed:
    """Run `token-broker probe args…` as its own process, off this event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker",
        "probe",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env if env is not None else _without_broker_variables(),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return Probed(proc.returncode, out.decode(), err.decode())


async def probe_here(
    capsys: pytest.CaptureFixture[str], *args: str, env: dict[str, str] | None = None
) -> Probed:
    """Run `token-broker probe args…` in this process (the CLI's own `main`, in a thread so
    that this event loop keeps serving), with only the TOKEN_BROKER_ variables of `env`."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("TOKEN_BROKER_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(env or {})
    try:
        code = await asyncio.to_thread(main, ["probe", *args])
    finally:
        for name in env or {}:
            del os.environ[name]
        os.environ.update(saved)
    out, err = capsys.readouterr()
    return Probed(code, out, err)


def _without_broker_variables() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TOKEN_BROKER_")}


def where(broker: Broker, listener: str) -> list[str]:
    """The probe's option that points it at `listener` of `broker`."""
    if listener == "unix":
        return ["--socket", str(broker.daemon.unix_path)]
    host, port = broker.daemon.tcp_address or ("", 0)
    return ["--url", f"http://{host}:{port}"]


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("what", PROBES)
async def test_a_ready_broker_passes_both_probes(
    start_broker: StartBroker, what: str, listener: str
) -> None:
    """With every service fetched, `probe live` and `probe ready` exit 0 on either listener,
    through the broker's request guards, and say so on stdout."""
    broker = await start_broker()
    await broker.settled()
    probed = await probe(what, *where(broker, listener))
    assert (probed.code, probed.err) == (0, "")
    route = {"live": "/healthz", "ready": "/readyz"}[what]
    assert probed.out == f"{what}: GET {route} answered 200\n"


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_broker_whose_only_service_fails_is_alive_but_not_ready(
    start_broker: StartBroker,
    emulator: Emulator,
    listener: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A broker with no usable credential: `probe live` exits 0, `probe ready` exits 1 and
    names the service waiting on stderr (the real process, then the command in this one)."""
    emulator.state.fail("mms.token", status=403)
    broker = await start_broker(services={"fraud": demo.TOKEN_SERVICE})
    await broker.settled()
    assert (await probe("live", *where(broker, listener))).code == 0
    refused = "ready: GET /readyz answered 503: no usable credential yet for fraud\n"
    for run in (
        probe("ready", *where(broker, listener)),
        probe_here(capsys, "ready", *where(broker, listener)),
    ):
        probed = await run
        assert (probed.code, probed.out, probed.err) == (1, "", refused)
    assert (await probe_here(capsys, "live", *where(broker, listener))).code == 0


@pytest.mark.parametrize("what", PROBES)
async def test_no_broker_at_the_socket_is_a_clear_failure(short_dir: Path, what: str) -> None:
    """No socket file: exit 1, and stderr names the socket and asks whether it runs."""
    missing = short_dir / "absent.sock"
    probed = await probe(what, "--socket", str(missing))
    assert probed.code == 1
    assert probed.err == (
        f"{what}: cannot reach the broker at {missing}: No such file or directory; is it running?\n"
    )


@pytest.mark.parametrize("what", PROBES)
async def test_no_broker_at_the_url_is_a_clear_failure(what: str) -> None:
    """Nothing listening on the port: exit 1, and stderr names the URL and asks whether it
    runs."""
    with socket.socket() as sock:  # a port just freed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    probed = await probe(what, "--url", url)
    assert probed.code == 1
    assert probed.err == (
        f"{what}: cannot reach the broker at {url}: Connection refused; is it running?\n"
    )


@pytest.fixture
def silent_socket(short_dir: Path) -> Iterator[Path]:
    """A Unix socket that accepts connections (its backlog) and never answers."""
    path = short_dir / "silent.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        sock.listen(8)
        yield path


async def test_a_broker_that_does_not_answer_fails_at_the_probe_timeout(
    silent_socket: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A listener that never answers: exit 1 after --timeout, saying so."""
    probed = await probe_here(capsys, "live", "--socket", str(silent_socket), "--timeout", "0.5")
    assert probed.code == 1
    assert probed.err == f"live: no answer from the broker at {silent_socket} within 0.5 s\n"


async def test_the_environment_points_the_probe_like_the_other_client_commands(
    start_broker: StartBroker, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without options, $TOKEN_BROKER_URL is used, else $TOKEN_BROKER_SOCKET."""
    broker = await start_broker()
    await broker.settled()
    host, port = broker.daemon.tcp_address or ("", 0)
    url = {"TOKEN_BROKER_URL": f"http://{host}:{port}"}
    assert (await probe_here(capsys, "live", env=url)).code == 0
    socket_env = {"TOKEN_BROKER_SOCKET": str(broker.daemon.unix_path)}
    assert (await probe_here(capsys, "live", env=socket_env)).code == 0
    absent = {"TOKEN_BROKER_SOCKET": str(broker.daemon.unix_path) + ".absent"}
    probed = await probe_here(capsys, "live", env=absent)
    assert probed.code == 1 and ".absent" in probed.err


async def test_a_url_that_is_not_http_is_refused_with_the_form_to_use(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--url https://… or with a port that is no number exits 1 and shows the form it wants."""
    for url in ("https://127.0.0.1:8765", "http://127.0.0.1:http"):
        probed = await probe_here(capsys, "live", "--url", url)
        assert probed.code == 1 and "http://127.0.0.1:8765" in probed.err, probed.err


async def test_a_wrong_command_line_exits_2() -> None:
    """An unknown probe, or both --socket and --url, is a usage error: exit 2."""
    assert (await probe("dead")).code == 2
    assert (await probe("live", "--socket", "/x", "--url", "http://127.0.0.1:1")).code == 2


async def test_the_probe_imports_nothing_heavy(short_dir: Path) -> None:
    """`token-broker probe`, through the CLI's own entry, imports neither the event loop,
    nor aiohttp, structlog, MSAL, cryptography, nor the broker's configuration or logging."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "importtime",
        "-m",
        "broker",
        "probe",
        "live",
        "--socket",
        str(short_dir / "absent.sock"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    lines = [line for line in err.decode().splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in lines[1:]}
    assert "broker.probe" in imported and "broker.cli" in imported  # the path is the real one
    heavy = {name for name in imported if name.split(".")[0] in HEAVY or name in HEAVY}
    assert heavy == set()


def test_the_default_socket_is_the_brokers() -> None:
    """The probe's default socket (kept apart from broker.config to import nothing of it)
    is the broker's default socket."""
    assert Path(DEFAULT_SOCKET) == DEFAULT_SOCKET_PATH
