"""Fleet mode's deployment files: compose/fleet.yaml (Redis, two brokers and their secrets)
parses, validates and runs its parts for real here (the secrets' maker, Redis's start and
healthcheck on Debian's redis-server, the brokers' configuration through check-config and a
fleet under the ACL it gives)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.assembly import new_fleet
from broker.config import Config, load_config
from broker.models import AccessToken, AuthKind
from broker.saved_credentials import Saved

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
FLEET_COMPOSE = DEPLOY / "compose" / "fleet.yaml"
BROKERS = ("broker-1", "broker-2")
SECRETS_DIR = "/run/token-broker-fleet"  # where the brokers and Redis mount fleet-secrets
SH = "/bin/sh"  # what the images' `sh -c` and CMD-SHELL run
README_ACL = re.compile(r"^ACL SETUSER (\S+) on >PASSWORD (.+)$", re.MULTILINE)

Manifest = dict[str, Any]


def fleet_compose() -> Manifest:
    loaded: Manifest = yaml.safe_load(FLEET_COMPOSE.read_text())
    return loaded


def services() -> Manifest:
    found: Manifest = fleet_compose()["services"]
    return found


def volumes_of(service: Manifest) -> dict[str, tuple[str, str]]:
    """A service's mounts: target -> (source, options)."""
    found = {}
    for spec in service.get("volumes", []):
        source, target, *options = spec.split(":")
        found[target] = (source, options[0] if options else "rw")
    return found


def shell(text: str) -> str:
    """A compose string as the container's shell sees it: `$$` is compose's `$`."""
    return text.replace("$$", "$")


def readme_acl() -> tuple[str, str]:
    """The user and rules of the README's ACL for the broker's user."""
    found = README_ACL.search((REPO / "README.md").read_text())
    assert found is not None, "README.md lost its ACL SETUSER line"
    return found.group(1), found.group(2)


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """The files fleet-secrets makes, made by its own code in a directory of the test's."""
    directory = tmp_path / "fleet-secrets"
    directory.mkdir()
    make_secrets(directory)
    return directory


def make_secrets(directory: Path) -> None:
    code = services()["fleet-secrets"]["entrypoint"][-1]
    assert "/var/lib/token-broker" in code
    subprocess.run(
        [sys.executable, "-I", "-S", "-c", code.replace("/var/lib/token-broker", str(directory))],
        check=True,
        timeout=20,
    )


def test_fleet_compose_validates_against_the_compose_spec() -> None:
    """deploy/compose/fleet.yaml is valid for the Compose Specification (schema bundled)."""
    checker = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(FLEET_COMPOSE)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_brokers_share_one_configuration_redis_and_secrets() -> None:
    """Both brokers run one configuration with the same secrets (read-only), each its own
    socket volume, beside the emulator and Redis on one loopback, the second started once
    the first is up; every service is read-only, with no capability and no published port."""
    found = services()
    mounts = [volumes_of(found[name]) for name in BROKERS]
    assert mounts[0]["/etc/token-broker/broker.toml"] == mounts[1]["/etc/token-broker/broker.toml"]
    for each in mounts:
        assert each[SECRETS_DIR] == ("fleet-secrets", "ro")
    assert mounts[0]["/run/token-broker"][0] != mounts[1]["/run/token-broker"][0]
    for name in BROKERS:
        broker = found[name]
        assert broker["command"] == ["run", "-c", "/etc/token-broker/broker.toml"]
        assert broker["network_mode"] == "service:emulator"
        assert broker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert broker["healthcheck"]["test"] == ["CMD", "token-broker", "probe", "live"]
    assert found["broker-2"]["depends_on"]["broker-1"]["condition"] == "service_healthy"
    redis = found["redis"]
    assert redis["network_mode"] == "service:emulator"
    assert volumes_of(redis)[SECRETS_DIR] == ("fleet-secrets", "ro")
    assert redis["depends_on"]["fleet-secrets"]["condition"] == "service_completed_successfully"
    assert volumes_of(found["fleet-secrets"])["/var/lib/token-broker"][0] == "fleet-secrets"
    for name, service in found.items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "ports" not in service, name


def test_the_secrets_are_made_once_and_private(tmp_path: Path, secrets_dir: Path) -> None:
    """fleet-secrets makes a 32-byte key and a password, mode 0600 each, and keeps them
    when run again (a restart must not split the fleet)."""
    key, password = secrets_dir / "fleet.key", secrets_dir / "redis-password"
    assert len(key.read_bytes()) == 32 and re.fullmatch(r"[0-9a-f]{64}", password.read_text())
    for path in (key, password):
        assert path.stat().st_mode & 0o777 == 0o600
    before = key.read_bytes(), password.read_bytes()
    make_secrets(secrets_dir)
    assert (key.read_bytes(), password.read_bytes()) == before


def brokers_config(tmp_path: Path, secrets_dir: Path, redis_port: int | None = None) -> Path:
    """compose/fleet.toml as the brokers read it, its mounted paths moved under tmp_path
    (and Redis's port to `redis_port`, when given)."""
    [(source, _)] = {
        volumes_of(services()[name])["/etc/token-broker/broker.toml"] for name in BROKERS
    }
    text = (FLEET_COMPOSE.parent / source).read_text()
    ca = tmp_path / "emulator-ca.pem"
    ca.write_text("not parsed at load time")
    text = text.replace("/emulator-ca/emulator-ca.pem", str(ca))
    text = text.replace(SECRETS_DIR, str(secrets_dir))
    if redis_port is not None:
        text = text.replace("127.0.0.1:6379", f"127.0.0.1:{redis_port}")
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return path


def test_the_brokers_configuration_passes_check_config(tmp_path: Path, secrets_dir: Path) -> None:
    """compose/fleet.toml passes `token-broker check-config` with the environment compose
    gives the brokers and the files fleet-secrets makes: fleet mode on the Redis and user
    of fleet.yaml, the password and key shown by where they are, never their bytes."""
    config = brokers_config(tmp_path, secrets_dir)
    environment = services()["broker-1"]["environment"]
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin", **environment},
    )
    assert result.returncode == 0, result.stderr
    fleet = tomllib.loads(result.stdout)["fleet"]
    script = shell(services()["redis"]["entrypoint"][-1])
    assert fleet["redis_url"] == "redis://127.0.0.1:6379/0" and "--port 6379" in script
    assert f"user {fleet['username']} on " in script
    assert fleet["password"] == f"file {secrets_dir / 'redis-password'}"
    assert fleet["encryption_key"] == f"file {secrets_dir / 'fleet.key'}"
    password = (secrets_dir / "redis-password").read_text()
    assert password not in result.stdout + result.stderr
    assert tomllib.loads(result.stdout)["listen"]["tcp"]["enabled"] is False


@contextmanager
def redis_from(script: str, moves: list[tuple[str, str]]) -> Iterator[int]:
    """Redis started by a deployment's own start script on Debian's redis-server, each of
    `moves` (a mounted path, an option) replaced by this test's, on a free port; the port."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: `make test` installs Debian's package")
    port = _free_port()
    for mounted, here in [*moves, ("--port 6379", f"--port {port}")]:
        assert mounted in script, mounted
        script = script.replace(mounted, here)
    process = subprocess.Popen([SH, "-c", script], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            assert process.poll() is None, "Redis did not start from the deployment's script"
            assert time.monotonic() < deadline, "Redis never listened"
            time.sleep(0.02)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def in_memory(tmp_path: Path, secrets: str, secrets_dir: Path) -> list[tuple[str, str]]:
    """Where a Redis script's in-memory files and mounted password go in a test."""
    return [
        ("/tmp/users.acl", str(tmp_path / "users.acl")),
        ("--dir /tmp", f"--dir {tmp_path}"),
        (secrets, str(secrets_dir)),
    ]


@pytest.fixture
def compose_redis(tmp_path: Path, secrets_dir: Path) -> Iterator[int]:
    """Redis as fleet.yaml starts it."""
    script = shell(services()["redis"]["entrypoint"][-1])
    with redis_from(script, in_memory(tmp_path, SECRETS_DIR, secrets_dir)) as port:
        yield port


def expected_acl(password: str) -> str:
    """The README's ACL (less +client|setinfo, which Redis 7.0 lacks and redis-py does
    without) as the user of a Redis ACL file, after the default user turned off."""
    user, rules = readme_acl()
    rules = rules.replace(" +client|setinfo", "")
    return f"user default off\nuser {user} on >{password} {rules}\n"


def test_redis_starts_with_the_readmes_acl_and_passes_its_healthcheck(
    tmp_path: Path, secrets_dir: Path, compose_redis: int
) -> None:
    """Redis's script writes the README's ACL (less +client|setinfo, which Redis 7.0 lacks
    and redis-py does without), private to Redis, with the default user off; the
    healthcheck passes, and a client without the password gets nothing."""
    acl = (tmp_path / "users.acl").read_text()
    assert acl == expected_acl((secrets_dir / "redis-password").read_text())
    assert (tmp_path / "users.acl").stat().st_mode & 0o077 == 0
    check = shell(services()["redis"]["healthcheck"]["test"][1])
    check = check.replace(SECRETS_DIR, str(secrets_dir)).replace("-p 6379", f"-p {compose_redis}")
    assert subprocess.run([SH, "-c", check], timeout=10, check=False).returncode == 0
    anonymous = subprocess.run(
        [shutil.which("redis-cli") or "/usr/bin/redis-cli", "-p", str(compose_redis), "get", "x"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr


async def test_a_broker_of_the_compose_fleet_shares_under_that_acl(
    tmp_path: Path, secrets_dir: Path, compose_redis: int
) -> None:
    """A broker with compose/fleet.toml's [fleet] takes the lease, writes and reads back an
    entry on that Redis as its ACL user: the ACL allows all the broker does."""
    config = load_config(
        brokers_config(tmp_path, secrets_dir, compose_redis),
        environ=services()["broker-1"]["environment"],
    )
    await shares(config)


async def shares(config: Config) -> None:
    """A broker of `config` takes the lease, writes and reads back its service's entry."""
    fleet = new_fleet(config, config.service_identity)
    assert fleet is not None
    try:
        lease = await fleet.lease("fraud")
        assert lease is not None
        now = time.time()
        saved = Saved(
            AccessToken("compose-fleet-TOKEN-1", AuthKind.TOKEN, now + 600, now + 300), now
        )
        assert await fleet.write("fraud", saved, 600)
        await lease.release()
        assert await fleet.read("fraud") == saved
        assert fleet.health == "up"
    finally:
        await fleet.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# --- Kubernetes ------------------------------------------------------------------------


KUBERNETES = DEPLOY / "kubernetes" / "fleet"


def objects(directory: Path) -> dict[str, Manifest]:
    """The objects of a directory's YAML files, by kind (one of each)."""
    found: dict[str, Manifest] = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"{directory}: two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def pod_spec(directory: Path) -> Manifest:
    spec: Manifest = objects(directory)["Deployment"]["spec"]["template"]
    return spec


def container(spec: Manifest, name: str) -> Manifest:
    every = spec["spec"].get("initContainers", []) + spec["spec"]["containers"]
    found: list[Manifest] = [c for c in every if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def volume_of(spec: Manifest, name: str) -> Manifest:
    found: list[Manifest] = [v for v in spec["spec"]["volumes"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def redis_pod() -> Manifest:
    return pod_spec(KUBERNETES / "redis")


def fleet_secret_files() -> dict[str, str]:
    """The broker's secret files by Secret key: where the pod mounts each."""
    spec = pod_spec(KUBERNETES)
    broker = container(spec, "token-broker")
    [mounted] = [m for m in broker["volumeMounts"] if m["name"] == "token-broker-secrets"]
    files = {}
    for source in volume_of(spec, "token-broker-secrets")["projected"]["sources"]:
        for item in source["secret"]["items"]:
            files[item["key"]] = f"{mounted['mountPath']}/{item['path']}"
    return files


def configmap_toml() -> str:
    text: str = objects(KUBERNETES)["ConfigMap"]["data"]["broker.toml"]
    return text


def kubernetes_config(tmp_path: Path, redis_port: int | None = None) -> Path:
    """The ConfigMap's broker.toml with each secret file it names made under tmp_path (and
    Redis's address moved to loopback and `redis_port`, when given)."""
    text = configmap_toml()
    contents = {
        "client-secret": b"sp-secret-value\n",
        "fleet.key": bytes(range(32)),
        "redis-password": b"k8s-redis-PASSWORD-1",
    }
    for key, path in fleet_secret_files().items():
        here = tmp_path / key
        here.write_bytes(contents[key])
        here.chmod(0o600)
        assert f'"{path}"' in text, path
        text = text.replace(f'"{path}"', f'"{here}"')
    if redis_port is not None:
        text = text.replace("token-broker-redis:6379", f"127.0.0.1:{redis_port}")
    config = tmp_path / "broker.toml"
    config.write_text(text)
    return config


def test_the_configmap_passes_check_config_on_the_redis_service(tmp_path: Path) -> None:
    """The ConfigMap's broker.toml passes `token-broker check-config` with its secret files
    where the pod mounts them, in fleet mode on the Redis Service's name and port as the
    user Redis's ACL defines, the secrets shown by where they are, never their bytes."""
    result = subprocess.run(
        [sys.executable, "-m", "broker", "check-config", "-c", str(kubernetes_config(tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    fleet = tomllib.loads(result.stdout)["fleet"]
    service = objects(KUBERNETES / "redis")["Service"]
    [port] = service["spec"]["ports"]
    assert fleet["redis_url"] == f"redis://{service['metadata']['name']}:{port['port']}/0"
    [redis] = redis_pod()["spec"]["containers"]
    [container_port] = redis["ports"]
    assert port["targetPort"] == container_port["name"]
    assert f"--port {container_port['containerPort']}" in redis["command"][-1]
    assert f"user {fleet['username']} on " in redis["command"][-1]
    assert fleet["password"] == f"file {tmp_path / 'redis-password'}"
    assert fleet["encryption_key"] == f"file {tmp_path / 'fleet.key'}"
    assert "k8s-redis-PASSWORD-1" not in result.stdout + result.stderr


def test_the_fleets_secrets_reach_the_broker_alone() -> None:
    """The key and the password are the Secret token-broker-fleet, mounted read-only into
    the broker's container only, root's with the pod's group (0440, which the broker accepts
    for a key); Redis mounts the password alone, never the key."""
    spec = pod_spec(KUBERNETES)
    projected = volume_of(spec, "token-broker-secrets")["projected"]
    assert projected["defaultMode"] == 0o440
    by_secret = {s["secret"]["name"]: s["secret"]["items"] for s in projected["sources"]}
    assert {i["key"] for i in by_secret["token-broker-fleet"]} == {"fleet.key", "redis-password"}
    broker = container(spec, "token-broker")
    assert broker["securityContext"]["runAsGroup"] == spec["spec"]["securityContext"]["fsGroup"]
    [mounted] = [m for m in broker["volumeMounts"] if m["name"] == "token-broker-secrets"]
    assert mounted["readOnly"] is True
    for app in spec["spec"]["containers"]:
        assert all(m["name"] != "token-broker-secrets" for m in app["volumeMounts"])
    redis_secret = volume_of(redis_pod(), "redis-password")["secret"]
    assert redis_secret["secretName"] == "token-broker-fleet"
    assert [item["key"] for item in redis_secret["items"]] == ["redis-password"]


def test_redis_is_a_locked_down_service_only_the_fleet_reaches() -> None:
    """Redis runs unprivileged on a read-only root with its files in memory; its Service
    selects its pod, and its NetworkPolicy admits the app's pods alone, on its port."""
    redis_objects = objects(KUBERNETES / "redis")
    labels = redis_pod()["metadata"]["labels"]
    selector = redis_objects["Service"]["spec"]["selector"]
    assert selector.items() <= labels.items()
    policy = redis_objects["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    [rule] = policy["ingress"]
    [source] = rule["from"]
    app_labels = pod_spec(KUBERNETES)["metadata"]["labels"]
    assert source["podSelector"]["matchLabels"].items() <= app_labels.items()
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    spec = redis_pod()["spec"]
    assert spec["automountServiceAccountToken"] is False
    [redis] = spec["containers"]
    context = redis["securityContext"]
    assert context["runAsNonRoot"] is True and context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert volume_of(redis_pod(), "tmp")["emptyDir"]["medium"] == "Memory"


@pytest.fixture
def kubernetes_redis(tmp_path: Path) -> Iterator[int]:
    """Redis as the Redis Deployment starts it, with the ConfigMap's secret files made."""
    kubernetes_config(tmp_path)
    [redis] = redis_pod()["spec"]["containers"]
    script = shell(redis["command"][-1])
    moves = [*in_memory(tmp_path, "/run/secrets/redis", tmp_path)]
    moves.append(("--bind 0.0.0.0", "--bind 127.0.0.1"))
    with redis_from(script, moves) as port:
        yield port


def test_kubernetes_redis_starts_with_the_readmes_acl(
    tmp_path: Path, kubernetes_redis: int
) -> None:
    """The Redis Deployment's own script writes the README's ACL, and its readiness probe,
    logged in as that user, passes."""
    acl = (tmp_path / "users.acl").read_text()
    assert acl == expected_acl((tmp_path / "redis-password").read_text())
    [redis] = redis_pod()["spec"]["containers"]
    probe = redis["readinessProbe"]["exec"]["command"][-1]  # probes are not expanded
    probe = probe.replace("/run/secrets/redis", str(tmp_path))
    probe = probe.replace("-p 6379", f"-p {kubernetes_redis}")
    assert subprocess.run([SH, "-c", probe], timeout=10, check=False).returncode == 0


async def test_a_broker_of_the_configmap_shares_under_that_acl(
    tmp_path: Path, kubernetes_redis: int
) -> None:
    """A broker of the ConfigMap's [fleet] leases, writes and reads back an entry on the
    Redis Deployment's Redis, as the user its ACL defines."""
    config = load_config(kubernetes_config(tmp_path, kubernetes_redis), environ={})
    await shares(config)
