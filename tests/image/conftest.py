"""The built image, run by a real Docker daemon against the emulator on the host's loopback.

`make image-test` builds the image and runs these under deploy/image/dockerd.sh; a plain
`pytest` leaves this folder out (tests/conftest.py). Every container runs as the image says
(uid 10001) and as the README tells operators to run it: read-only root, no capabilities,
no new privileges. The host talks to it the way a client app does: through the socket
directory, mounted from the host, and over TCP on 127.0.0.1 (the container shares the host's
network, which is how it reaches the emulator too).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.emulator import seed as demo

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = os.environ.get("IMAGE", f"token-broker:{VERSION}")
UID = 10001
SOCKET_DIR = "/run/token-broker"
CONFIG = "/etc/token-broker/broker.toml"
CA = "/etc/token-broker/emulator-ca.pem"
SECRET = "/run/secrets/token-broker/client-secret"
SERVICES = {"fraud": demo.TOKEN_SERVICE, "churn": demo.KEY_SERVICE}
READY_WITHIN_S = 30.0
# Runs the README gives operators; every container of these tests keeps to them.
HARDENED = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


def docker(
    *args: str, timeout: float = 60.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`docker ARGS…`; with `check`, a failure raises with Docker's own words."""
    executable = shutil.which("docker")
    assert executable, "no docker command: run `make image-tools`"
    done = subprocess.run(
        [executable, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: exit {done.returncode}\n{done.stderr}")
    return done


def inspect(name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(docker("inspect", name).stdout)
    return found[0]


class UnixConnection(http.client.HTTPConnection):
    """HTTP to the broker's socket, as a client app on the host would speak it."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(str(self.path))
        self.sock = sock


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def ask(connection: http.client.HTTPConnection, path: str) -> Reply:
    """GET `path` with the header the broker asks of local clients."""
    try:
        connection.request("GET", path, headers={"Metadata": "true"})
        response = connection.getresponse()
        return Reply(response.status, response.read())
    finally:
        connection.close()


@dataclass(frozen=True)
class HostEmulator:
    """`token-broker emulator` running on the host: its port, CA and `[cloud]` table."""

    port: int
    ca_path: Path
    cloud_table: str

    def score(self, scoring_uri: str, credential: str) -> Reply:
        """POST a scoring request with the credential, trusting the emulator's CA."""
        context = ssl.create_default_context(cafile=str(self.ca_path))
        request = urllib.request.Request(  # noqa: S310 (the emulator's https URL)
            scoring_uri,
            data=b'{"data": [[1, 2, 3]]}',
            headers={"Authorization": f"Bearer {credential}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as answer:  # noqa: S310
                return Reply(answer.status, answer.read())
        except urllib.error.HTTPError as refused:
            return Reply(refused.code, refused.read())


def _lines(stream: Any) -> tuple[queue.Queue[str], threading.Thread]:
    """The stream's lines, read by a thread (until its end), so that waiting for one can
    time out."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    reader = threading.Thread(target=pump, name="emulator-stdout", daemon=True)
    reader.start()
    return lines, reader


def _announcement(lines: queue.Queue[str], within: float) -> list[str]:
    """The emulator's opening lines, up to the demo principal's (the last it prints)."""
    deadline = time.monotonic() + within
    seen: list[str] = []
    while not (seen and seen[-1].startswith("# demo workspace")):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("the emulator did not start:\n" + "".join(seen))
        try:
            seen.append(lines.get(timeout=left))
        except queue.Empty:
            continue
    return seen


@pytest.fixture(scope="session")
def image() -> str:
    """The image `make image` built; a missing one fails with what to run."""
    if docker("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"Docker has no image {IMAGE}: run `make image` (or `make image-test`)")
    return IMAGE


@pytest.fixture(scope="session")
def emulator() -> Iterator[HostEmulator]:
    """The emulator on 127.0.0.1 (a port of its own), tokens of ten minutes."""
    directory = Path(tempfile.mkdtemp(prefix="tb-image-emulator-"))
    command = [
        str(Path(sys.executable).with_name("token-broker")),
        "emulator",
        "--port",
        "0",
        "--ca-dir",
        str(directory),
        "--token-lifetime",
        "600",
        "--refresh-after",
        "300",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    assert process.stdout is not None
    output, reader = _lines(process.stdout)
    try:
        lines = _announcement(output, within=20.0)
        start = lines.index("[cloud]\n")
        end = lines.index("\n", start)
        table = "".join(lines[start:end])
        [port] = {int(line.rsplit(":", 1)[1]) for line in lines if "listening on" in line}
        yield HostEmulator(port, directory / "emulator-ca.pem", table)
    finally:
        process.terminate()
        process.wait(timeout=10)
        reader.join(timeout=5)
        process.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)


def free_port() -> int:
    """A loopback port nothing listens on now, for the broker's TCP listener."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def config_text(emulator: HostEmulator, tcp_port: int) -> str:
    """broker.toml for the container: the emulator's own `[cloud]` table with the CA's path
    in the container, the demo principal's secret from a mounted file, both demo services."""
    cloud = emulator.cloud_table.replace(f'"{emulator.ca_path}"', f'"{CA}"')
    services = "".join(
        f"""
[[service]]
name = "{name}"
subscription_id = "{demo.SUBSCRIPTION_ID}"
resource_group = "{demo.RESOURCE_GROUP}"
workspace = "{demo.WORKSPACE}"
web_service = "{web_service}"
"""
        for name, web_service in SERVICES.items()
    )
    return f"""\
[listen.unix]
path = "{SOCKET_DIR}/broker.sock"

[listen.tcp]
host = "127.0.0.1"
port = {tcp_port}

[log]
format = "json"

{cloud}
[identity.demo]
tenant_id = "{demo.TENANT_ID}"
client_id = "{demo.CLIENT_ID}"
client_secret_file = "{SECRET}"
{services}"""


@dataclass(frozen=True)
class Container:
    """A broker container and what the host reaches it by."""

    name: str
    socket_dir: Path
    tcp_port: int

    @property
    def socket(self) -> Path:
        return self.socket_dir / "broker.sock"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.tcp_port}"

    def unix(self) -> UnixConnection:
        return UnixConnection(self.socket)

    def tcp(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.tcp_port, timeout=5.0)

    def exec(self, *command: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return docker("exec", self.name, *command, timeout=timeout, check=False)

    def logs(self) -> str:
        done = docker("logs", self.name, check=False)
        return done.stdout + done.stderr

    def wait_ready(self, within: float = READY_WITHIN_S) -> None:
        """Until /readyz answers 200 through the socket; the broker's log if it never does."""
        deadline = time.monotonic() + within
        last = "no answer yet"
        while time.monotonic() < deadline:
            if not inspect(self.name)["State"]["Running"]:
                raise AssertionError(f"the container stopped:\n{self.logs()}")
            if self.socket.exists():
                try:
                    reply = ask(self.unix(), "/readyz")
                except OSError as exc:
                    last = repr(exc)
                else:
                    if reply.status == 200:
                        return
                    last = f"{reply.status} {reply.body!r}"
            time.sleep(0.2)
        raise AssertionError(f"not ready within {within} s ({last}):\n{self.logs()}")


StartContainer = Callable[..., Container]


@pytest.fixture(scope="session")
def start_container(image: str, emulator: HostEmulator) -> Iterator[StartContainer]:
    """Start broker containers from the image; all are removed at the end of the session."""
    started: list[Container] = []
    directories: list[Path] = []

    def start(*options: str, network: str = "host") -> Container:
        directory = Path(tempfile.mkdtemp(prefix="tb-image-", dir="/tmp"))
        directories.append(directory)
        port = free_port()
        config = directory / "broker.toml"
        config.write_text(config_text(emulator, port))
        secret = directory / "client-secret"
        secret.write_text(demo.CLIENT_SECRET + "\n")
        # Owned by the image's user, as a mounted Secret with fsGroup would be readable by it.
        for path, mode in ((config, 0o640), (secret, 0o600)):
            os.chown(path, UID, UID)
            path.chmod(mode)
        socket_dir = directory / "run"
        socket_dir.mkdir(mode=0o750)
        os.chown(socket_dir, UID, UID)
        name = f"token-broker-test-{os.getpid()}-{len(started)}"
        docker(
            "run",
            "--detach",
            "--name",
            name,
            *HARDENED,
            "--network",
            network,
            "--volume",
            f"{config}:{CONFIG}:ro",
            "--volume",
            f"{emulator.ca_path}:{CA}:ro",
            "--volume",
            f"{secret}:{SECRET}:ro",
            "--volume",
            f"{socket_dir}:{SOCKET_DIR}",
            *options,
            image,
        )
        container = Container(name, socket_dir, port)
        started.append(container)
        return container

    yield start
    for container in started:
        docker("rm", "--force", container.name, check=False)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def broker(start_container: StartContainer) -> Container:
    """One broker container, ready (both services have their credential), for the session."""
    container = start_container()
    container.wait_ready()
    return container
