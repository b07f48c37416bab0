"""deploy/compose.yaml's demo, run from the built image with the options compose.yaml gives
each service (no compose here: `docker run` with the same command, mounts and settings)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.image.conftest import REPO, docker

pytestmark = pytest.mark.timeout(120)

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
Service = dict[str, Any]


class Project:
    """compose.yaml's services as `docker run` options, with volumes and names of their own."""

    def __init__(self, image: str) -> None:
        loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
        self.services: dict[str, Service] = loaded["services"]
        self.image = image
        self.prefix = f"token-broker-compose-{os.getpid()}"
        self.volumes = {name: f"{self.prefix}-{name}" for name in loaded["volumes"]}
        self.containers: list[str] = []

    def name(self, service: str) -> str:
        return f"{self.prefix}-{service}"

    def options(self, service: Service) -> list[str]:
        found: list[str] = ["--read-only"] if service.get("read_only") else []
        for capability in service.get("cap_drop", []):
            found += ["--cap-drop", capability]
        for option in service.get("security_opt", []):
            found += ["--security-opt", option]
        for path in service.get("tmpfs", []):
            found += ["--tmpfs", path]
        for key, value in service.get("environment", {}).items():
            found += ["--env", f"{key}={value}"]
        for spec in service.get("volumes", []):
            source, target, *mode = spec.split(":")
            source = self.volumes.get(source) or str((DEPLOY / source).resolve())
            found += ["--volume", ":".join([source, target, *mode])]
        mode = service.get("network_mode", "")
        # compose's own network for the emulator: none is enough, it keeps to loopback.
        network = f"container:{self.name(mode.split(':', 1)[1])}" if mode else "none"
        return [*found, "--network", network]

    def start(self, service: str) -> str:
        name = self.name(service)
        settings = self.services[service]
        options = self.options(settings)
        docker("run", "--detach", "--name", name, *options, self.image, *settings["command"])
        self.containers.append(name)
        return name

    def wait_healthy(self, service: str, within: float = 30.0) -> None:
        """Until the service's compose healthcheck command succeeds inside it."""
        name = self.name(service)
        _, *command = self.services[service]["healthcheck"]["test"]
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if docker("exec", name, *command, check=False).returncode == 0:
                return
            time.sleep(0.5)
        logs = docker("logs", name, check=False)
        raise AssertionError(f"{service} never healthy:\n{logs.stdout}{logs.stderr}")

    def run(self, service: str) -> str:
        """Run the service to its end (the client) and return what it printed."""
        settings = self.services[service]
        done = docker("run", "--rm", *self.options(settings), self.image, *settings["command"])
        return done.stdout

    def remove(self) -> None:
        for name in self.containers:
            docker("rm", "--force", name, check=False)
        for volume in self.volumes.values():
            docker("volume", "rm", "--force", volume, check=False)


@pytest.fixture
def project(image: str) -> Iterator[Project]:
    """compose.yaml's project on the built image; its containers and volumes removed after."""
    made = Project(image)
    yield made
    made.remove()


def test_compose_demo_serves_a_token_to_its_client(project: Project) -> None:
    """The image serves the emulator, the broker beside it gets both demo services' credentials
    from it, and the client container prints a Bearer line read through the shared socket."""
    project.start("emulator")
    project.wait_healthy("emulator")
    broker = project.start("broker")
    project.wait_healthy("broker")
    deadline = time.monotonic() + 30
    while docker("exec", broker, "token-broker", "status", check=False).stdout.count(" fresh ") < 2:
        assert time.monotonic() < deadline, docker("logs", broker, check=False).stderr
        time.sleep(0.5)
    printed = project.run("client")
    assert printed.startswith("Bearer ey"), printed
