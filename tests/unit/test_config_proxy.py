"""The [proxy] table: defaults when absent, and each bad value named with its line and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import Config, ProxyConfig, load_config, render_effective
from broker.errors import ConfigError

pytestmark = pytest.mark.timeout(10)

BASE = """\
[cloud]
name = "AzureCloud"

[identity.main]
tenant_id = "t"
client_id = "11111111-0000-0000-0000-000000000001"
client_secret_env = "SECRET"

[[service]]
name = "aml"
kind = "entra"
scope = "https://ml.azure.com/.default"
"""
ENV = {"SECRET": "s3cr3t-value"}
PROXY_LINE = BASE.count("\n") + 2  # the line of the first key under [proxy]


def load(tmp_path: Path, proxy: str | None) -> Config:
    path = tmp_path / "broker.toml"
    path.write_text(BASE if proxy is None else BASE + "\n[proxy]\n" + proxy)
    return load_config(path, environ=ENV)


def test_defaults_without_the_table(tmp_path: Path) -> None:
    """Without [proxy] the proxy is on with its documented limits."""
    proxy = load(tmp_path, None).proxy
    assert proxy == ProxyConfig()
    assert proxy.enabled and proxy.max_body_bytes == 16 << 20
    assert proxy.retry_buffer_bytes == 64 << 10 and proxy.timeout_s == 60.0


def test_every_key_is_read_and_rendered(tmp_path: Path) -> None:
    """Each key is read, and check-config shows the effective [proxy] table."""
    config = load(
        tmp_path,
        "enabled = false\nmax_body_bytes = 1000\nretry_buffer_bytes = 10\ntimeout_s = 2.5\n"
        "connect_timeout_s = 1\nmax_header_bytes = 2048\nmax_connections = 3\n",
    )
    assert config.proxy == ProxyConfig(False, 1000, 10, 2.5, 1.0, 2048, 3)
    text = render_effective(config)
    assert "[proxy]" in text and "max_body_bytes = 1000" in text and "enabled = false" in text


@pytest.mark.parametrize(
    ("proxy", "key", "phrase"),
    [
        ("max_body_bytes = -1\n", "proxy.max_body_bytes", "from 0 to"),
        ('max_body_bytes = "16M"\n', "proxy.max_body_bytes", "expected an integer"),
        ("max_body_bytes = 100\nretry_buffer_bytes = 200\n", "proxy.retry_buffer_bytes", "more"),
        ("retry_buffer_bytes = 1073741824\n", "proxy.retry_buffer_bytes", "from 0 to"),
        ("timeout_s = 0\n", "proxy.timeout_s", "more than zero"),
        ("timeout_s = -3\n", "proxy.timeout_s", "more than zero"),
        ("timeout_s = 5\nconnect_timeout_s = 9\n", "proxy.connect_timeout_s", "more than"),
        ("connect_timeout_s = nan\n", "proxy.connect_timeout_s", "finite"),
        ("max_header_bytes = 10\n", "proxy.max_header_bytes", "from 1024"),
        ("max_connections = 0\n", "proxy.max_connections", "from 1"),
        ('enabled = "yes"\n', "proxy.enabled", "expected a boolean"),
        ("max_body = 1\n", "proxy.max_body", "did you mean"),
    ],
)
def test_problems(tmp_path: Path, proxy: str, key: str, phrase: str) -> None:
    """Each mistake in [proxy] is reported as `file:line: [key] message — fix`."""
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, proxy)
    problems = [p for p in raised.value.problems if p.key == key]
    assert problems, raised.value
    problem = problems[0]
    assert phrase in problem.message or phrase in problem.fix, problem
    assert problem.line is not None and problem.line >= PROXY_LINE
    assert str(problem).startswith(f"{tmp_path / 'broker.toml'}:{problem.line}: [{key}] ")
    assert " — " in str(problem)


def test_invalid_values_cannot_be_built() -> None:
    """The value object refuses what the parser would have reported."""
    with pytest.raises(ValueError, match="retry_buffer_bytes"):
        ProxyConfig(max_body_bytes=10, retry_buffer_bytes=11)
    with pytest.raises(ValueError, match="connect_timeout_s"):
        ProxyConfig(timeout_s=1, connect_timeout_s=2)
    with pytest.raises(ValueError, match="max_connections"):
        ProxyConfig(max_connections=0)
