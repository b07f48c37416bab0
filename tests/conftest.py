"""Shared fixtures: the emulator on real HTTPS sockets, broker configurations, log capture."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from broker import log
from broker.emulator import Emulator
from broker.emulator import seed as demo

CLIENT_SECRET = demo.CLIENT_SECRET
IMAGE_TESTS = Path(__file__).parent / "image"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--image",
        action="store_true",
        help="collect tests/image/ too: run the built container image (needs Docker; "
        "`make image-test` builds the image and passes this)",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/image/ needs Docker and a built image: `make test` leaves it out."""
    if collection_path == IMAGE_TESTS and not config.getoption("--image"):
        return True
    return None


class OffsetClock:
    """Real time plus an offset the test moves forward: the broker's injected clock."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (their paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def logs() -> Iterator[io.StringIO]:
    """Every log line the broker writes during the test, as JSON text, kept off stdout."""
    stream = io.StringIO()
    log.configure("json", "debug", stream=stream)
    yield stream
    log.reset()


def logged(logs: io.StringIO, name: str) -> list[dict[str, Any]]:
    """The JSON log records of event `name` among `logs`, in order."""
    lines = (json.loads(line) for line in logs.getvalue().splitlines() if line.strip())
    return [line for line in lines if line.get("event") == name]


@pytest.fixture
def every_repeat(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write every repeat of a warning: for tests that read each retry's own log line."""
    monkeypatch.setattr(log.REPEATS, "interval_s", 0.0)


@pytest.fixture
async def emulator(short_dir: Path) -> AsyncIterator[Emulator]:
    """The emulator with the demo tenant, workspace and services, lifetimes of seconds."""
    state = demo.demo_state(token_lifetime_s=60.0, refresh_after_s=30.0)
    async with Emulator(state=state, ca_dir=short_dir) as emu:
        yield emu


SERVICES = {
    "fraud": demo.TOKEN_SERVICE,
    "churn": demo.KEY_SERVICE,
}


OPEN_BUDGET = "service_calls_burst = 100000\nservice_calls_per_minute = 600000"


def config_text(
    emu: Emulator,
    directory: Path,
    *,
    services: dict[str, str] | None = None,
    identity: str | None = None,
    extra_service_keys: str = "",
    refresh: str = "",
    listen: str = "",
) -> str:
    """A broker.toml for the emulator: both listeners in `directory`, TCP on port 0.

    Tokens of seconds refresh far more often than real ones, so the call budget is
    opened wide unless `refresh` sets it: tests of the budget set their own. `listen`
    holds `[listen]` keys (limits, the watch heartbeat)."""
    secret_file = directory / "client-secret"
    if not secret_file.exists():
        secret_file.write_text(CLIENT_SECRET + "\n")
        secret_file.chmod(0o600)
    identity = identity or f'client_secret_file = "{secret_file}"'
    budget = "" if "_calls_" in refresh else OPEN_BUDGET
    blocks = [
        (f"[listen]\n{listen}\n\n" if listen else "")
        + f"""\
[listen.unix]
path = "{directory / "broker.sock"}"

[listen.tcp]
host = "127.0.0.1"
port = 0

[cloud]
name = "custom"
authority_host = "{emu.authority_host}"
resource_manager = "{emu.resource_manager}"
region_api = "{emu.region_api}"
ca_bundle = "{emu.ca_path}"

[refresh]
{refresh}
{budget}

[identity.main]
tenant_id = "{demo.TENANT_ID}"
client_id = "{demo.CLIENT_ID}"
{identity}
"""
    ]
    for name, web_service in (services or SERVICES).items():
        blocks.append(
            f"""
[[service]]
name = "{name}"
subscription_id = "{demo.SUBSCRIPTION_ID}"
resource_group = "{demo.RESOURCE_GROUP}"
workspace = "{demo.WORKSPACE}"
web_service = "{web_service}"
{extra_service_keys}
"""
        )
    return "".join(blocks)


@pytest.fixture
def write_config(short_dir: Path) -> Callable[[str], Path]:
    """Write a configuration text to broker.toml in the short directory."""

    def write(text: str) -> Path:
        path = short_dir / "broker.toml"
        path.write_text(text)
        return path

    return write


@dataclass(frozen=True)
class SelfSigned:
    """A throw-away certificate and its RSA key, for client-assertion sign-ins."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> str:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()


def self_signed() -> SelfSigned:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-broker-test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return SelfSigned(key, cert)


class RedisServer:
    """A real redis-server (Debian's package) in a temporary directory, on a Unix socket
    and a loopback port, persisting nothing; tests may stop and start it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, *extra: str) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is missing: `make test` installs Debian's package")
        self.process = subprocess.Popen(
            [
                executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers():
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail(f"redis-server did not start: {self._log_tail()}")
            time.sleep(0.01)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None
        self.socket.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command(self, *args: str | bytes) -> bytes:
        """Run one command over the Unix socket with redis-cli's raw output."""
        found = shutil.which("redis-cli")
        assert found is not None
        return subprocess.run(
            [found, "-s", str(self.socket), "--raw", *map(_text, args)],
            check=True,
            capture_output=True,
            timeout=10,
        ).stdout

    def _answers(self) -> bool:
        """Whether it answers on its Unix socket (plain text even when TCP speaks TLS)."""
        try:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(0.2)
                conn.connect(str(self.socket))
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        log_file = self.directory / "redis.log"
        return log_file.read_text()[-500:] if log_file.exists() else "(no log)"


def _text(arg: str | bytes) -> str:
    return arg if isinstance(arg, str) else arg.decode()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class TlsRedis:
    """A redis-server speaking TLS only on its loopback port, with a certificate for
    127.0.0.1 and localhost signed by a CA the test made (`ca_file`); a CA that signed
    nothing it serves is in `other_ca_file`."""

    server: RedisServer
    ca_file: Path
    other_ca_file: Path

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.server.port}/0"


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    """A redis-server on TLS for the module's tests, stopped after them."""
    import trustme

    directory = Path(tempfile.mkdtemp(prefix="tb-redis-tls-", dir="/tmp"))
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(directory / "server.key"))
    cert.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    other.cert_pem.write_to_path(str(directory / "other-ca.pem"))
    server = RedisServer(directory)
    server.start(
        *("--port", "0", "--tls-port", str(server.port)),
        *("--tls-cert-file", str(directory / "server.pem")),
        *("--tls-key-file", str(directory / "server.key")),
        *("--tls-ca-cert-file", str(directory / "ca.pem")),
        *("--tls-auth-clients", "no"),
    )
    yield TlsRedis(server, directory / "ca.pem", directory / "other-ca.pem")
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def started_redis() -> Iterator[RedisServer]:
    """A redis-server of its own on a Unix socket in a fresh directory, stopped after."""
    directory = Path(tempfile.mkdtemp(prefix="tb-redis-", dir="/tmp"))
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole test run, stopped after it."""
    with started_redis() as server:
        yield server


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The run's redis-server, running and empty at the start of the test."""
    if not redis_server.running:
        redis_server.start()
    redis_server.command("FLUSHALL")
    yield redis_server
    if not redis_server.running:
        redis_server.start()
