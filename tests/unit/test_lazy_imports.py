"""What an idle broker does not load: redis-py (and the cryptography it imports) without
[fleet], and the emulator. Each is several MiB of RSS (docs/benchmarks.md, memory). MSAL
and requests wait for the first sign-in, after the broker listens."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

_PROBE = (
    "import sys, broker.cli, broker.daemon; "
    "lazy = ('redis', 'cryptography', 'broker.emulator', 'msal', 'requests'); "
    "print(' '.join(m for m in lazy if m in sys.modules))"
)


def test_daemon_import_leaves_redis_cryptography_and_emulator_unloaded() -> None:
    """Importing the daemon and the CLI, as `token-broker run` does, loads none of them."""
    loaded = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []
