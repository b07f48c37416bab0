"""The image as operators run it: unprivileged, read-only, small, serving the host its tokens."""

from __future__ import annotations

import json
import stat
import subprocess
import time

import pytest

from tests.image.conftest import (
    CONFIG,
    SERVICES,
    SOCKET_DIR,
    UID,
    Container,
    HostEmulator,
    StartContainer,
    ask,
    docker,
    inspect,
)

pytestmark = pytest.mark.timeout(120)

# What the image may weigh, as `docker image inspect` counts it (the debootstrap'd bookworm
# base and the venv; 179 MB when this was written). A heavier image needs a reason.
SIZE_BUDGET_BYTES = 220_000_000
LISTENERS = ("unix", "tcp")


def status_lines(container: Container) -> dict[str, str]:
    """The broker process's /proc/1/status, as its fields (it is the container's PID 1)."""
    done = container.exec("cat", "/proc/1/status")
    assert done.returncode == 0, done.stderr
    return dict(line.split(":\t", 1) for line in done.stdout.splitlines() if ":\t" in line)


def test_image_runs_as_the_unprivileged_user_10001(image: str, broker: Container) -> None:
    """The image's user is 10001:10001, the broker process runs as it, and so the socket the
    host sees belongs to uid 10001 with the broker's mode 0660."""
    assert inspect(image)["Config"]["User"] == f"{UID}:{UID}"
    fields = status_lines(broker)
    assert fields["Uid"].split() == [str(UID)] * 4
    assert fields["Gid"].split() == [str(UID)] * 4
    assert broker.exec("id", "-u").stdout.strip() == str(UID)
    info = broker.socket.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert info.st_uid == UID
    assert stat.S_IMODE(info.st_mode) == 0o660


def test_image_keeps_within_its_size_budget(image: str) -> None:
    """The image weighs less than its budget (SIZE_BUDGET_BYTES)."""
    size = inspect(image)["Size"]
    print(f"{image}: {size / 1e6:.0f} MB")
    assert size < SIZE_BUDGET_BYTES, f"{size / 1e6:.0f} MB"


def test_container_runs_read_only_without_capabilities(broker: Container) -> None:
    """Root file system read-only (even the broker's own state directory), every capability
    dropped, no new privileges: and the broker serves all the same."""
    host = inspect(broker.name)["HostConfig"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    fields = status_lines(broker)
    for capabilities in ("CapEff", "CapPrm", "CapBnd"):
        assert int(fields[capabilities], 16) == 0, capabilities
    assert fields["NoNewPrivs"].strip() == "1"
    # /var/lib/token-broker is the image user's own: only the read-only root refuses it.
    wrote = broker.exec("touch", "/var/lib/token-broker/written")
    assert wrote.returncode != 0
    assert "Read-only file system" in wrote.stderr


def test_image_installs_nothing_and_compiles_nothing(broker: Container) -> None:
    """The venv holds the broker but no pip, and the image has no compiler or curl: what
    runs is what was built."""
    found = broker.exec(
        "sh", "-c", "for tool in pip pip3 gcc cc curl wget; do command -v $tool; done; true"
    )
    assert found.stdout.strip() == ""
    assert broker.exec("python", "-m", "pip", "--version").returncode != 0
    assert broker.exec("token-broker", "--version").returncode == 0


@pytest.mark.parametrize("listener", LISTENERS)
@pytest.mark.parametrize("service", SERVICES)
def test_host_gets_the_emulators_credential_from_the_container(
    broker: Container, emulator: HostEmulator, listener: str, service: str
) -> None:
    """Through the mounted socket and over TCP, the host gets each service's credential,
    which that service's scoring endpoint accepts and the other service's refuses."""
    connect = broker.unix if listener == "unix" else broker.tcp
    reply = ask(connect(), f"/v1/token/{service}")
    assert reply.status == 200, reply.body
    credential = reply.json()
    assert credential["service"] == service
    assert credential["token_type"] == "Bearer"
    described = ask(connect(), f"/v1/services/{service}").json()
    scored = emulator.score(described["scoring_uri"], credential["access_token"])
    assert scored.status == 200, scored.body
    assert scored.json()["auth"] == credential["auth"]
    [other] = set(SERVICES) - {service}
    elsewhere = ask(connect(), f"/v1/services/{other}").json()["scoring_uri"]
    assert emulator.score(elsewhere, credential["access_token"]).status == 401


def test_both_listeners_serve_one_credential(broker: Container) -> None:
    """The socket and TCP answer the same credential for each service: one cache behind both."""
    for service in SERVICES:
        by_socket = ask(broker.unix(), f"/v1/token/{service}").json()["access_token"]
        by_tcp = ask(broker.tcp(), f"/v1/token/{service}").json()["access_token"]
        assert by_socket == by_tcp, service


def probe(container: Container, which: str, *where: str) -> subprocess.CompletedProcess[str]:
    """`token-broker probe live|ready [WHERE]` inside the container."""
    return container.exec("token-broker", "probe", which, *where)


def places(container: Container) -> list[tuple[str, ...]]:
    """Where a probe may ask: its default, the socket as the manifests name it, the TCP URL."""
    return [(), ("--socket", f"{SOCKET_DIR}/broker.sock"), ("--url", container.url)]


def test_probe_ready_passes_inside_the_container(broker: Container) -> None:
    """`token-broker probe ready` and `probe live` exit 0 inside the container of a broker
    whose services all have their credential, on the socket and over TCP."""
    for which in ("live", "ready"):
        for where in places(broker):
            done = probe(broker, which, *where)
            assert done.returncode == 0, (where, done.stderr)


def test_status_inside_the_container_needs_no_option(broker: Container) -> None:
    """`docker exec … token-broker status` finds the socket by default and shows both
    services fresh, as deploy/README.md tells operators."""
    done = broker.exec("token-broker", "status")
    assert done.returncode == 0, done.stderr
    for service in SERVICES:
        [row] = [line for line in done.stdout.splitlines() if line.split()[:1] == [service]]
        assert "fresh" in row.split(), row


def test_container_stops_on_sigterm_and_leaves_no_socket(start_container: StartContainer) -> None:
    """`docker stop` (SIGTERM) ends the broker well within the grace period, with exit code 0,
    and the socket file it made on the host's directory is gone."""
    container = start_container()
    container.wait_ready()
    begun = time.monotonic()
    docker("stop", "--time", "20", container.name)
    took = time.monotonic() - begun
    state = inspect(container.name)["State"]
    assert state["ExitCode"] == 0, container.logs()
    assert took < 10, f"{took:.1f} s"
    assert not container.socket.exists()
    events = [json.loads(line) for line in container.logs().splitlines() if line.startswith("{")]
    assert any(event.get("event") == "broker.stopped" for event in events), container.logs()


def test_image_healthcheck_turns_healthy(start_container: StartContainer) -> None:
    """The image's own HEALTHCHECK turns the container healthy where no cloud can be reached
    (a network of its own, loopback only): alive, and not ready."""
    container = start_container(
        "--health-interval", "1s", "--health-start-period", "0s", network="none"
    )
    deadline = time.monotonic() + 30
    health: dict[str, object] = {}
    while time.monotonic() < deadline:
        health = inspect(container.name)["State"].get("Health") or {}
        if health.get("Status") == "healthy":
            break
        time.sleep(0.5)
    assert health.get("Status") == "healthy", (health, container.logs())
    assert ask(container.unix(), "/readyz").status == 503
    for where in places(container):
        assert probe(container, "live", *where).returncode == 0, where
        assert probe(container, "ready", *where).returncode == 1, (where, "no credential")


def test_configuration_is_mounted_not_baked_in(image: str) -> None:
    """The image holds no broker.toml: without the mounted file the broker exits 2 and says
    which file is missing."""
    done = docker("run", "--rm", "--read-only", "--network", "none", image, timeout=60, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert CONFIG in done.stdout + done.stderr
