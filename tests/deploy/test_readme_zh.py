"""The Chinese README: its configurations pass check-config, and its commands and hosts exist."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from broker.cli import EXIT_OK
from broker.config.model import CLOUDS

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
README_ZH = REPO / "README.zh-CN.md"
README_EN = REPO / "README.md"
BROKER = [sys.executable, "-m", "broker"]
SECRET = "readme-zh-client-secret-value"

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`\n]+)`")
# A command stands at the start of a line, after `sudo`, or after a shell separator.
COMMAND_START = r"(?:^|(?<=[|;&(])|(?<=\bsudo ))\s*"
BROKER_COMMAND = re.compile(COMMAND_START + r"token-broker((?: +[^\s|;&#)]+)*)")
MAKE_COMMAND = re.compile(COMMAND_START + r"make +([A-Za-z][\w.-]*)")
SYSTEM_PATH = re.compile(r'"(/(?:etc|run|var)/[^"]+)"')
HOST_KEYS = ("authority_host", "resource_manager", "region_api")
HOST_ROW = re.compile(r"^\|[^|]*\| `(\w+)` \| `([^`]+)` \|$", re.MULTILINE)

TEXT = README_ZH.read_text(encoding="utf-8")
TOML_BLOCKS = [body for lang, body in FENCE.findall(TEXT) if lang == "toml"]


def code_lines() -> list[str]:
    """Every line of every fenced block and every inline code span of the Chinese page."""
    prose = FENCE.sub("", TEXT)
    fenced = [line for _, body in FENCE.findall(TEXT) for line in body.splitlines()]
    return fenced + INLINE.findall(prose)


def broker_commands() -> list[list[str]]:
    """Each `token-broker …` command shown, as its words after the program name."""
    found: list[list[str]] = []
    for line in code_lines():
        for match in BROKER_COMMAND.finditer(line):
            words = match.group(1).split()
            if words and words not in found:
                found.append(words)
    return found


def make_targets() -> list[str]:
    """Each `make TARGET` shown."""
    return sorted({m.group(1) for line in code_lines() for m in MAKE_COMMAND.finditer(line)})


def command_parts(words: list[str]) -> tuple[list[str], list[str]]:
    """The subcommand path (one or two leading words) and the options used with it."""
    path = words[:1]
    if len(words) > 1 and not words[1].startswith("-"):
        path = words[:2]  # `keys rotate`, `api-key new`, or `token SERVICE`: --help tells
    options = [word.split("=")[0] for word in words if re.fullmatch(r"--?[a-z][\w-]*(=.*)?", word)]
    return path, options


def materialise(block: str, root: Path) -> tuple[Path, dict[str, str]]:
    """The block as a file under root, with every file it names made there; its environment."""
    text = SYSTEM_PATH.sub(lambda m: f'"{root}{m.group(1)}"', block)
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    for table in tomllib.loads(text).get("identity", {}).values():
        for key, value in table.items():
            write_source(key, value, root, env)
    path = root / "broker.toml"
    path.write_text(text, encoding="utf-8")
    return path, env


def write_source(key: str, value: Any, root: Path, env: dict[str, str]) -> None:
    """Provide what one `[identity]` key points at: a file, a variable or a systemd credential."""
    if key.endswith("_file"):
        target = Path(value)
    elif key.endswith("_credential"):
        env["CREDENTIALS_DIRECTORY"] = str(root / "credentials")
        target = root / "credentials" / value
    elif key.endswith("_env"):
        env[value] = SECRET
        return
    else:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(SECRET, encoding="utf-8")
    target.chmod(0o600)


def check_config(block: str, root: Path) -> subprocess.CompletedProcess[str]:
    """The real `token-broker check-config -c FILE` on the block."""
    path, env = materialise(block, root)
    return subprocess.run(
        [*BROKER, "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
        env=env,
    )


def test_readme_and_chinese_readme_link_each_other() -> None:
    """README links the Chinese page near its top, and the Chinese page links back."""
    english_head = README_EN.read_text(encoding="utf-8").splitlines()[:5]
    assert any("](README.zh-CN.md)" in line for line in english_head)
    assert "](README.md)" in "\n".join(TEXT.splitlines()[:5])


def test_chinese_readme_has_toml_blocks_and_commands() -> None:
    """The page shows configurations, broker commands and make targets for the tests below."""
    assert len(TOML_BLOCKS) >= 2
    shown = {words[0] for words in broker_commands()}
    assert {"run", "check-config", "token", "status"} <= shown
    assert {"demo", "test"} <= set(make_targets())


@pytest.mark.parametrize("index", range(len(TOML_BLOCKS)))
def test_each_toml_block_passes_check_config(index: int, tmp_path: Path) -> None:
    """Every TOML block is a complete configuration the real check-config accepts, secret masked."""
    result = check_config(TOML_BLOCKS[index], tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    assert "valid" in result.stderr
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.parametrize("words", broker_commands(), ids=" ".join)
def test_each_broker_command_shown_exists(words: list[str]) -> None:
    """Every `token-broker …` command shown is a real subcommand, and takes the options shown."""
    path, options = command_parts(words)
    result = subprocess.run(
        [*BROKER, *path, "--help"], capture_output=True, text=True, timeout=25, check=False
    )
    assert result.returncode == EXIT_OK, result.stderr
    for option in options:
        assert re.search(rf"(?<![\w-]){re.escape(option)}\b", result.stdout), option


@pytest.mark.parametrize("target", make_targets())
def test_each_make_target_shown_exists(target: str) -> None:
    """Every `make TARGET` shown is a target of the Makefile (make -n finds a rule for it)."""
    make = shutil.which("make")
    assert make is not None, "make is not installed: the README's quick start needs it"
    result = subprocess.run(
        [make, "-n", "-C", str(REPO), target],
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_china_hosts_match_the_built_in_profile() -> None:
    """The China cloud hosts the page states are exactly the AzureChinaCloud profile's."""
    stated = dict(HOST_ROW.findall(TEXT))
    profile = CLOUDS["AzureChinaCloud"]
    assert stated == {key: getattr(profile, key) for key in HOST_KEYS}


def test_china_example_resolves_to_the_stated_hosts(tmp_path: Path) -> None:
    """check-config on the AzureChinaCloud example prints the hosts the page's table states."""
    [block] = [b for b in TOML_BLOCKS if 'name = "AzureChinaCloud"' in b]
    result = check_config(block, tmp_path)
    assert result.returncode == EXIT_OK, result.stderr
    for key, host in HOST_ROW.findall(TEXT):
        assert f'{key} = "{host}"' in result.stdout
