"""The [compat] table: off by default, and checked when on."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import load_config, render_effective
from broker.errors import ConfigError

pytestmark = pytest.mark.timeout(10)

BASE = """
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


def load(tmp_path: Path, compat: str) -> object:
    path = tmp_path / "broker.toml"
    path.write_text(BASE + "\n[compat]\n" + compat)
    return load_config(path, environ=ENV)


def test_off_by_default(tmp_path: Path) -> None:
    """Without [compat] no compatible route is enabled."""
    path = tmp_path / "broker.toml"
    path.write_text(BASE)
    assert not load_config(path, environ=ENV).compat.enabled


def test_imds_with_resources(tmp_path: Path) -> None:
    """IMDS with an allowlist loads, trailing slashes trimmed, and renders without secrets."""
    header = tmp_path / "header"
    header.write_text("x" * 32)
    config = load(
        tmp_path,
        f'imds = true\napp_service_header_file = "{header}"\n'
        'resources = ["https://ml.azure.com/"]\n',
    )
    assert config.compat.imds and config.compat.resources == ("https://ml.azure.com",)  # type: ignore[attr-defined]
    text = render_effective(config)  # type: ignore[arg-type]
    assert "[compat]" in text and "x" * 32 not in text


@pytest.mark.parametrize(
    ("compat", "key", "phrase"),
    [
        ("imds = true\n", "compat.resources", "no resource"),
        ('imds = true\nresources = ["ml.azure.com"]\n', "compat.resources", "resource URI"),
        (
            'imds = true\nresources = ["https://ml.azure.com"]\nidentity = "x"\n',
            "compat.identity",
            "no identity",
        ),
        (
            'app_service_header_file = "HEADER"\nresources = ["https://ml.azure.com"]\n',
            "compat.app_service_header_file",
            "fewer than 16",
        ),
        ("imds = true\nresources = []\nbogus = 1\n", "compat.bogus", "unknown"),
    ],
)
def test_problems(tmp_path: Path, compat: str, key: str, phrase: str) -> None:
    """Each mistake in [compat] names its key and what to do."""
    (tmp_path / "short").write_text("short")
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, compat.replace("HEADER", str(tmp_path / "short")))
    problem = next(p for p in raised.value.problems if p.key.startswith(key))
    assert phrase in problem.message, problem
