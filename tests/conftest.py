"""Shared fixtures: the emulator on real HTTPS sockets, broker configurations, log capture."""

from __future__ import annotations

import datetime as dt
import io
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from broker import log
from broker.emulator import Emulator
from broker.emulator import seed as demo

CLIENT_SECRET = demo.CLIENT_SECRET


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
