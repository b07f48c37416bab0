"""`[service.sink]`: a file a service's credential is written to, and a command run after."""

from __future__ import annotations

import grp
import pwd
import tomllib
from pathlib import Path

import pytest

from broker.cli import EXIT_CONFIG, main
from broker.config import Config, SinkConfig, load_config, render_effective
from broker.errors import ConfigError, ConfigProblem

pytestmark = pytest.mark.timeout(10)

ROOT_USER = pwd.getpwuid(0).pw_name
ROOT_GROUP = grp.getgrgid(0).gr_name

HEAD = """
[identity.main]
tenant_id = "t"
client_id = "c"
client_secret_file = "sp"
"""


def service(name: str, sink: str) -> str:
    return f"""
[[service]]
name = "{name}"
subscription_id = "sub-1"
resource_group = "rg"
workspace = "ws"
web_service = "{name}-svc"

[service.sink]
{sink}"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "sp").write_text("from-a-file\n")
    return tmp_path


def load(workdir: Path, text: str) -> Config:
    path = workdir / "broker.toml"
    path.write_text(text)
    return load_config(path, environ={"PATH": "/usr/bin:/bin"})


def problems(workdir: Path, text: str) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        load(workdir, text)
    return caught.value.problems


def only_problem(workdir: Path, sink: str) -> ConfigProblem:
    found = problems(workdir, HEAD + service("fraud", sink))
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def test_a_sink_with_only_a_path_takes_the_defaults(workdir: Path) -> None:
    """path alone: the bare token, mode 0600, the broker's own owner, no command."""
    config = load(workdir, HEAD + service("fraud", f'path = "{workdir}/fraud.token"\n'))
    assert config.services[0].sink == SinkConfig(workdir / "fraud.token")
    assert config.services[0].sink.mode == 0o600 and config.services[0].sink.format == "token"


def test_a_service_without_a_sink_has_none(workdir: Path) -> None:
    """No [service.sink] table: nothing is written."""
    text = HEAD + service("fraud", "").replace("[service.sink]\n", "")
    assert load(workdir, text).services[0].sink is None


def test_every_key_is_read(workdir: Path) -> None:
    """format, mode, owner and group by name, command and its timeout all reach SinkConfig."""
    sink = f"""path = "{workdir}/fraud.json"
format = "json"
mode = "0640"
owner = "{ROOT_USER}"
group = "{ROOT_GROUP}"
command = ["true", "--flag", "two words"]
command_timeout_s = 2.5
"""
    found = load(workdir, HEAD + service("fraud", sink)).services[0].sink
    assert found == SinkConfig(
        workdir / "fraud.json", "json", 0o640, 0, 0, ("true", "--flag", "two words"), 2.5
    )


def test_numeric_owner_group_and_integer_mode_are_taken_as_they_are(workdir: Path) -> None:
    """Ids need not exist on the machine; mode = 0o640 is the same as "0640"."""
    sink = f'path = "{workdir}/t"\nmode = 0o640\nowner = 4242\ngroup = 4343\nformat = "header"\n'
    found = load(workdir, HEAD + service("fraud", sink)).services[0].sink
    assert found is not None
    assert (found.mode, found.owner, found.group, found.format) == (0o640, 4242, 4343, "header")


def test_check_config_renders_the_sink_under_its_service(workdir: Path) -> None:
    """The effective configuration shows each sink as [service.sink], defaults included."""
    text = HEAD + service("fraud", f'path = "{workdir}/f"\ncommand = ["true"]\n')
    text += service("churn", "").replace("[service.sink]\n", "")
    parsed = tomllib.loads(render_effective(load(workdir, text)))
    assert parsed["service"][0]["sink"] == {
        "path": f"{workdir}/f",
        "format": "token",
        "mode": "0600",
        "command": ["true"],
        "command_timeout_s": 30.0,
    }
    assert "sink" not in parsed["service"][1]


@pytest.mark.parametrize(
    ("sink", "key", "message"),
    [
        ('format = "token"\n', "path", 'missing required key "path"'),
        ('path = "fraud.token"\n', "path", "is not an absolute path"),
        ('path = ""\n', "path", "path is empty"),
        ("path = 3\n", "path", "expected a string"),
        ('path = "/tmp"\n', "path", "/tmp is a directory"),
        ('path = "/x/t"\nformat = "jwt"\n', "format", '"jwt" is not a known sink format'),
        ('path = "/x/t"\nmode = "0644"\n', "mode", "lets every user on this machine read"),
        ('path = "/x/t"\nmode = "0602"\n', "mode", "lets every user on this machine write"),
        ('path = "/x/t"\nmode = "0700"\n', "mode", "sets execute bits"),
        ('path = "/x/t"\nmode = "4600"\n', "mode", "no setuid, setgid or sticky bits"),
        ('path = "/x/t"\nmode = 600\n', "mode", "TOML reads it as the decimal 600"),
        ('path = "/x/t"\nmode = "rw-------"\n', "mode", "expected an octal permission mode"),
        ('path = "/x/t"\nowner = "no-such-user-x7q"\n', "owner", 'no user named "no-such'),
        ('path = "/x/t"\ngroup = "no-such-group-x7q"\n', "group", 'no group named "no-such'),
        ('path = "/x/t"\nowner = -1\n', "owner", "must be a user id from 0"),
        ('path = "/x/t"\ncommand = "systemctl reload app"\n', "command", "expected an array"),
        ('path = "/x/t"\ncommand = []\n', "command", "command is an empty array"),
        ('path = "/x/t"\ncommand = ["true", 1]\n', "command[2]", "expected a string"),
        ('path = "/x/t"\ncommand = ["no-such-prog-x7q"]\n', "command[1]", "no program named"),
        ('path = "/x/t"\ncommand = ["/no/such/prog"]\n', "command[1]", "not an executable file"),
        ('path = "/x/t"\ncommand = ["kill -HUP 1"]\n', "command[1]", "contains a space"),
        ('path = "/x/t"\ncommand = [""]\n', "command[1]", "is an empty string"),
        ('path = "/x/t"\ncommand_timeout_s = 0\n', "command_timeout_s", "more than zero"),
        ('path = "/x/t"\ncommand_timeout_s = "5"\n', "command_timeout_s", "expected a number"),
        ('path = "/x/t"\nowners = "root"\n', "owners", 'unknown key "owners"'),
    ],
)
def test_each_bad_value_is_one_problem_at_its_key(
    workdir: Path, sink: str, key: str, message: str
) -> None:
    """Every bad sink value is reported once, at service[N].sink.KEY and its line, with a fix."""
    problem = only_problem(workdir, sink)
    assert problem.key == f"service[1].sink.{key}"
    assert message in problem.message
    assert problem.fix
    text = (HEAD + service("fraud", sink)).splitlines()
    first_key = key.split("[")[0]
    expected = next(
        (i for i, line in enumerate(text, 1) if line.startswith(f"{first_key} =")),
        text.index("[service.sink]") + 1,
    )
    assert problem.line == expected


def test_a_sink_that_is_not_a_table_is_refused(workdir: Path) -> None:
    """sink = "/path" instead of a [service.sink] table says how to write it."""
    text = HEAD + service("fraud", "").replace("[service.sink]\n", 'sink = "/x/t"\n')
    problem = only_problem_of(workdir, text)
    assert problem.key == "service[1].sink" and "expected a table" in problem.message


def only_problem_of(workdir: Path, text: str) -> ConfigProblem:
    found = problems(workdir, text)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


def test_two_services_may_not_write_the_same_file(workdir: Path) -> None:
    """A second sink on a path already used (spelled differently) is refused, at its line."""
    text = HEAD + service("fraud", f'path = "{workdir}/t"\n')
    text += service("churn", f'path = "{workdir}/sub/../t"\n')
    problem = only_problem_of(workdir, text)
    assert problem.key == "service[2].sink.path"
    assert "service[1] already writes its sink to" in problem.message
    assert problem.line == text.splitlines().index(f'path = "{workdir}/sub/../t"') + 1


def test_a_sink_may_not_overwrite_the_socket_the_cache_or_the_configuration(
    workdir: Path,
) -> None:
    """The Unix socket, the persisted cache and the configuration file are not sink paths."""
    key = workdir / "cache.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    top = f"""
[listen.unix]
path = "{workdir}/broker.sock"

[cache]
enabled = true
path = "{workdir}/cache.bin"
key_file = "{key}"
"""
    text = top + HEAD
    for name, target in (("a", "broker.sock"), ("b", "cache.bin"), ("c", "broker.toml")):
        text += service(name, f'path = "{workdir}/{target}"\n')
    found = problems(workdir, text)
    assert [p.key for p in found] == [f"service[{n}].sink.path" for n in (1, 2, 3)]
    assert "would overwrite the Unix socket" in found[0].message
    assert "would overwrite the persisted cache" in found[1].message
    assert "would overwrite the configuration file itself" in found[2].message


def test_the_cache_path_is_free_while_the_cache_is_disabled(workdir: Path) -> None:
    """A disabled cache writes nothing, so its path does not conflict."""
    text = f'[cache]\npath = "{workdir}/cache.bin"\n' + HEAD
    text += service("a", f'path = "{workdir}/cache.bin"\n')
    assert load(workdir, text).services[0].sink is not None


def test_check_config_exits_2_naming_file_line_key_and_fix(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A world-readable sink fails check-config with code 2 and a file:line: [key] line."""
    path = workdir / "broker.toml"
    text = HEAD + service("fraud", f'path = "{workdir}/t"\nmode = "0644"\n')
    path.write_text(text)
    assert main(["check-config", "-c", str(path)]) == EXIT_CONFIG
    line = text.splitlines().index('mode = "0644"') + 1
    err = capsys.readouterr().err
    assert f"{path}:{line}: [service[1].sink.mode] mode 0644 lets every user" in err
    assert " — use read and write bits" in err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": Path("relative")}, "must be absolute"),
        ({"path": Path("/t"), "mode": 0o604}, "must not give other users access"),
        ({"path": Path("/t"), "command_timeout_s": 0.0}, "more than zero"),
    ],
)
def test_sink_config_refuses_unsafe_values_built_by_hand(
    kwargs: dict[str, object], message: str
) -> None:
    """SinkConfig itself refuses what the parser refuses, for code that builds one."""
    with pytest.raises(ValueError, match=message):
        SinkConfig(**kwargs)  # type: ignore[arg-type]


def _secrets(workdir: Path) -> None:
    """Write every file the configurations of `OWN_FILES` name, each valid as it is."""
    for name, content in (
        ("cache.key", b"k" * 32),
        ("both.pem", b"-----BEGIN PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\n"),
        ("password", b"pfx-password\n"),
        ("ca.pem", b"-----BEGIN CERTIFICATE-----\n"),
        ("header", b"h" * 32 + b"\n"),
        ("token", b"federated.jwt.token\n"),
    ):
        (workdir / name).write_bytes(content)
        (workdir / name).chmod(0o600)


CUSTOM_CLOUD = """
[cloud]
name = "custom"
authority_host = "https://login.example"
resource_manager = "https://arm.example"
region_api = "https://{region}.ml.example"
ca_bundle = "ca.pem"
"""
CERTIFICATE = 'certificate_file = "both.pem"\ncertificate_password_file = "password"\n'
OWN_FILES = [
    pytest.param("", "sp", "identity.main.client_secret_file", id="client-secret"),
    pytest.param(
        '[cache]\nenabled = true\npath = "cache.bin"\nkey_file = "cache.key"\n',
        "cache.key",
        "cache.key_file",
        id="cache-key",
    ),
    pytest.param(f"@{CERTIFICATE}", "both.pem", "identity.main.certificate_file", id="certificate"),
    pytest.param(
        f"@{CERTIFICATE}", "password", "identity.main.certificate_password_file", id="password"
    ),
    pytest.param(
        '@federated_token_file = "token"\n',
        "token",
        "identity.main.federated_token_file",
        id="federated-token",
    ),
    pytest.param(CUSTOM_CLOUD, "ca.pem", "cloud.ca_bundle", id="ca-bundle"),
    pytest.param(
        '[compat]\napp_service_header_file = "header"\nresources = ["https://ml.azure.com"]\n',
        "header",
        "compat.app_service_header_file",
        id="compat-header",
    ),
]


def _with_own_file(workdir: Path, top: str, sink: str) -> str:
    """A configuration with `top` (an identity's credential when it starts with @)."""
    _secrets(workdir)
    head = HEAD.replace('client_secret_file = "sp"\n', top[1:]) if top[:1] == "@" else top + HEAD
    return head + service("fraud", sink)


@pytest.mark.parametrize(("top", "target", "key"), OWN_FILES)
def test_a_sink_may_not_overwrite_a_file_the_broker_reads(
    workdir: Path, top: str, target: str, key: str
) -> None:
    """A secret, key, certificate, password, token or CA file the broker reads is no sink."""
    text = _with_own_file(workdir, top, f'path = "{workdir}/{target}"\n')
    problem = only_problem_of(workdir, text)
    assert problem.key == "service[1].sink.path"
    assert problem.message == (
        f'the sink of "fraud" would overwrite {workdir / target}, which the broker reads as {key}'
    )
    assert problem.fix == "give the sink a path of its own"


@pytest.mark.parametrize("through", ["link", "directory"])
def test_a_symbolic_link_does_not_lead_a_sink_onto_a_secret(workdir: Path, through: str) -> None:
    """A sink path that reaches the client secret file through a link is refused."""
    if through == "link":
        sink = workdir / "innocent.token"
        sink.symlink_to(workdir / "sp")
    else:
        (workdir / "run").symlink_to(workdir, target_is_directory=True)
        sink = workdir / "run" / "sp"
    problem = only_problem_of(workdir, HEAD + service("fraud", f'path = "{sink}"\n'))
    assert problem.key == "service[1].sink.path"
    assert "which the broker reads as identity.main.client_secret_file" in problem.message


def test_a_sink_next_to_the_secrets_is_still_allowed(workdir: Path) -> None:
    """Only the files themselves are refused: a sink in the same directory is fine."""
    cache_table = str(OWN_FILES[1].values[0])
    text = _with_own_file(workdir, cache_table, f'path = "{workdir}/fraud.token"\n')
    assert load(workdir, text).services[0].sink == SinkConfig(workdir / "fraud.token")


def test_check_config_refuses_a_sink_onto_the_cache_key_with_exit_2(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config exits 2 with file:line, the sink's key, the file it would overwrite, a fix."""
    path = workdir / "broker.toml"
    top = '[cache]\nenabled = true\npath = "cache.bin"\nkey_file = "cache.key"\n'
    text = _with_own_file(workdir, top, f'path = "{workdir}/cache.key"\n')
    path.write_text(text)
    assert main(["check-config", "-c", str(path)]) == EXIT_CONFIG
    line = text.splitlines().index(f'path = "{workdir}/cache.key"') + 1
    err = capsys.readouterr().err
    assert (
        f'{path}:{line}: [service[1].sink.path] the sink of "fraud" would overwrite '
        f"{workdir}/cache.key, which the broker reads as cache.key_file"
    ) in err
    assert " — give the sink a path of its own" in err
    assert (workdir / "cache.key").read_bytes() == b"k" * 32


def test_a_sink_may_not_overwrite_a_systemd_credential(workdir: Path) -> None:
    """A file in $CREDENTIALS_DIRECTORY the broker reads (here the cache key) is no sink."""
    credentials = workdir / "credentials"
    credentials.mkdir()
    (credentials / "cache-key").write_bytes(b"k" * 32)
    (credentials / "cache-key").chmod(0o600)
    text = '[cache]\nenabled = true\npath = "cache.bin"\nkey_credential = "cache-key"\n' + HEAD
    text += service("fraud", f'path = "{credentials}/cache-key"\n')
    path = workdir / "broker.toml"
    path.write_text(text)
    environ = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(credentials)}
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=environ)
    (problem,) = caught.value.problems
    assert problem.key == "service[1].sink.path"
    assert problem.message.endswith("which the broker reads as cache.key_credential")
