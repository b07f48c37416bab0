"""docs/clients.md's snippets, run exactly as written against a live broker and the emulator.

Every fenced block of the page carries a marker comment just above it,
`<!-- snippet: NAME -->`. Each marked block is either in RUN (run here: curl, bash, the
venv's python, node, java, each in a subprocess with a minimal environment) or in NOT_RUN
(no toolchain on the project's machines; checked for its content only). A block in
neither, or an unmarked block, fails `test_every_block_is_marked_and_accounted_for`; a
missing curl, node or java fails the run rather than skipping it.

A snippet passes when its output is the emulator's scoring answer, which it gives only for
a currently valid token or key, and the emulator counted the scoring call.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from broker.emulator import Emulator
from tests.e2e.conftest import Broker, StartBroker

pytestmark = pytest.mark.timeout(60)

DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
_MARKED = re.compile(r"<!-- snippet: ([a-z0-9-]+) -->\n```([a-z]+)\n(.*?)^```$", re.S | re.M)
_FENCE_OPENING = re.compile(r"^```[a-z]+$", re.M)
_SNIPPET_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Snippet:
    name: str
    lang: str
    code: str


def snippets() -> dict[str, Snippet]:
    found: dict[str, Snippet] = {}
    for match in _MARKED.finditer(DOC.read_text()):
        name, lang, code = match.groups()
        assert name not in found, f"two blocks are marked {name!r} in {DOC.name}"
        found[name] = Snippet(name, lang, code)
    return found


@dataclass(frozen=True)
class Run:
    listener: str  # which of the broker's listeners the snippet is pointed at
    scores: bool = True  # whether it calls the model (else it describes the service)
    proxied: bool = False  # whether it calls the model through the broker's proxy


RUN = {
    "scoring-uri": Run("tcp", scores=False),
    "curl-tcp": Run("tcp"),
    "curl-unix": Run("unix"),
    "cli-one-liner": Run("unix"),
    "python-requests": Run("tcp"),
    "python-aiohttp": Run("unix"),
    "node-fetch": Run("tcp"),
    "node-http-unix": Run("unix"),
    "java-tcp": Run("tcp"),
    "proxy-curl-unix": Run("unix", proxied=True),
    "proxy-python-requests": Run("tcp", proxied=True),
}
NOT_RUN = {
    "go-unix": ("go", "no Go toolchain on the project's machines"),
    "dotnet-unix": ("csharp", "no .NET SDK on the project's machines"),
}
# The program each language needs, and the file a snippet of it is saved as.
TOOLS = {"sh": "curl", "python": sys.executable, "js": "node", "java": "java"}
FILES = {"sh": "snippet.sh", "python": "snippet.py", "js": "score.mjs", "java": "Score.java"}


@dataclass
class Live:
    emulator: Emulator
    broker: Broker
    home: Path
    env: dict[str, str]  # every variable the snippets may see, CA settings included


@pytest.fixture
async def live(emulator: Emulator, start_broker: StartBroker, short_dir: Path) -> Live:
    """The emulator and a broker with both listeners, and the environment for snippets."""
    broker = await start_broker()
    await broker.settled()
    assert broker.daemon.unix_path is not None and broker.daemon.tcp_address is not None
    host, port = broker.daemon.tcp_address
    ca = str(emulator.ca_path)
    home = short_dir / "home"
    home.mkdir()
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(home),  # no ~/.curlrc, ~/.npmrc or the like of the user running the tests
        "LANG": "C.UTF-8",
        # nothing may leave the machine: no proxy, for every host
        "NO_PROXY": "*",
        "no_proxy": "*",
        "TOKEN_BROKER_URL": f"http://{host}:{port}",
        "TOKEN_BROKER_SOCKET": str(broker.daemon.unix_path),
        # the emulator's own CA, through each runtime's standard setting
        "CURL_CA_BUNDLE": ca,
        "REQUESTS_CA_BUNDLE": ca,
        "SSL_CERT_FILE": ca,
        "NODE_EXTRA_CA_CERTS": ca,
        "JAVA_TOOL_OPTIONS": _java_trust_store(emulator.ca_path, short_dir),
    }
    return Live(emulator, broker, home, env)


def _java_trust_store(ca_path: Path, directory: Path) -> str:
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    store = directory / "truststore.p12"
    cert = pkcs12.PKCS12Certificate(ca, b"emulator-ca")
    store.write_bytes(pkcs12.serialize_java_truststore([cert], serialization.NoEncryption()))
    return f"-Djavax.net.ssl.trustStore={store} -Djavax.net.ssl.trustStoreType=PKCS12"


async def run_snippet(live: Live, snippet: Snippet, env: dict[str, str]) -> tuple[str, str]:
    """Save the snippet as a user would and run it; its stdout and stderr, after exit 0."""
    assert snippet.lang in TOOLS, f"{snippet.name}: no way to run a ```{snippet.lang} block"
    tool = TOOLS[snippet.lang]
    # Not a skip: a documented snippet nobody ran is a snippet that may not work.
    assert shutil.which(tool, path=env["PATH"]) is not None, (
        f"{tool} is not installed, so the {snippet.lang} snippets of {DOC.name} cannot be "
        "checked: install it (curl, nodejs and a JDK are on the project's machines)"
    )
    path = live.home / FILES[snippet.lang]
    path.write_text(snippet.code)
    argv = {
        "sh": ["bash", str(path)],
        "python": [sys.executable, str(path)],
        "js": ["node", str(path)],
        "java": ["java", str(path)],
    }[snippet.lang]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=live.home,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), _SNIPPET_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 0, f"{snippet.name} exited {proc.returncode}:\n{stdout}\n{stderr}"
    return stdout, stderr


def snippet_env(live: Live, run: Run, service: str, scoring_uri: str) -> dict[str, str]:
    """The environment with only the chosen listener's variable: a snippet reading the other
    one would find its default, where no broker listens, and fail."""
    other = "TOKEN_BROKER_SOCKET" if run.listener == "tcp" else "TOKEN_BROKER_URL"
    env = {k: v for k, v in live.env.items() if k != other}
    if run.proxied:  # no scoring URI and no CA: the broker makes the call
        ca = ("CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "NODE_EXTRA_CA_CERTS")
        return {k: v for k, v in env.items() if k not in ca} | {"SERVICE": service}
    return env | {"SERVICE": service, "SCORING_URI": scoring_uri}


async def scoring_uri(live: Live, service: str) -> str:
    reply = await live.broker.client("unix").get(f"/v1/services/{service}")
    assert reply.status == 200, reply.text
    uri: str = reply.json()["scoring_uri"]
    assert uri.startswith(live.emulator.base_url)
    return uri


@pytest.mark.parametrize("name", sorted(RUN))
async def test_snippet_calls_the_model(live: Live, name: str) -> None:
    """The snippet fetches the token from the broker and the model accepts it."""
    await check_snippet(live, name, "fraud", expected_auth="token")


async def test_key_services_work_the_same(live: Live) -> None:
    """A key service's credential goes through the same snippet unchanged."""
    await check_snippet(live, "curl-tcp", "churn", expected_auth="key")


async def check_snippet(live: Live, name: str, service: str, *, expected_auth: str) -> None:
    snippet, run = snippets()[name], RUN[name]
    uri = await scoring_uri(live, service)
    scored_before = live.emulator.state.count("score")
    stdout, stderr = await run_snippet(live, snippet, snippet_env(live, run, service, uri))
    if not run.scores:
        described = json.loads(stdout)
        assert described["service"] == service and described["scoring_uri"] == uri
        assert "access_token" not in described
        return
    assert json.loads(stdout) == {"accepted": True, "auth": expected_auth}, stderr
    assert live.emulator.state.count("score") == scored_before + 1


async def test_proxied_key_services_work_the_same(live: Live) -> None:
    """Through the proxy, a key service needs nothing more from the client either."""
    await check_snippet(live, "proxy-curl-unix", "churn", expected_auth="key")


def test_every_block_is_marked_and_accounted_for() -> None:
    """No snippet goes untested by accident: each fenced block is marked, and each marked
    block is either run above or listed in NOT_RUN with its reason."""
    found = snippets()
    assert len(_FENCE_OPENING.findall(DOC.read_text())) == len(found), (
        "a fenced block without a '<!-- snippet: NAME -->' line above it"
    )
    assert set(found) == set(RUN) | set(NOT_RUN)
    assert not set(RUN) & set(NOT_RUN)


@pytest.mark.parametrize("name", sorted(NOT_RUN))
def test_snippets_not_run_are_complete(name: str) -> None:
    """The Go and .NET snippets exist, in their language, and do what the others do."""
    snippet = snippets()[name]
    lang, _reason = NOT_RUN[name]
    assert snippet.lang == lang
    for needed in ('"Metadata", "true"', "/v1/token/", "Bearer", "SCORING_URI", "SERVICE"):
        assert needed in snippet.code, f"{name} lacks {needed}"
    assert "TOKEN_BROKER_SOCKET" in snippet.code and "/run/token-broker/broker.sock" in snippet.code


def test_every_snippet_sends_the_metadata_header() -> None:
    """Each block that talks to the broker sends Metadata: true (the CLI sends it itself)."""
    for snippet in snippets().values():
        if "token-broker token" in snippet.code:
            continue
        assert re.search(r"""['"]?Metadata['"]?\s*[:,]\s*['"]?true""", snippet.code), snippet.name


def test_readme_shows_the_tested_curl_snippet() -> None:
    """README's Clients section links the page and repeats the curl snippet run above."""
    readme = (DOC.parents[1] / "README.md").read_text()
    assert "(docs/clients.md)" in readme
    assert f"```sh\n{snippets()['curl-tcp'].code}```" in readme
