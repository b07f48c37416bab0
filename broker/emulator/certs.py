"""The emulator's TLS: a throwaway certificate authority made with trustme, and a server
certificate it signs for 127.0.0.1 and localhost (and the bound host, if another).

The CA's certificate is written to `emulator-ca.pem` in the given directory, or in a
temporary directory that `TlsMaterial.close` removes. Its private key never leaves memory.
"""

from __future__ import annotations

import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

import trustme

CA_FILE_NAME = "emulator-ca.pem"
_DEFAULT_NAMES = ("127.0.0.1", "localhost")


@dataclass(slots=True)
class TlsMaterial:
    """The server's SSL context and where the CA that clients must trust was written."""

    context: ssl.SSLContext
    ca_path: Path
    _tmpdir: tempfile.TemporaryDirectory[str] | None

    def close(self) -> None:
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def create_tls(host: str, ca_dir: Path | None) -> TlsMaterial:
    """A fresh CA, a server certificate for `host` and the loopback names, the CA on disk."""
    ca = trustme.CA(organization_name="token-broker emulator")
    names = [*_DEFAULT_NAMES, *([host] if host and host not in _DEFAULT_NAMES else [])]
    server_cert = ca.issue_cert(*names)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    tmpdir = None
    if ca_dir is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="token-broker-emulator-")
        ca_dir = Path(tmpdir.name)
    ca_dir.mkdir(parents=True, exist_ok=True)
    ca_path = ca_dir / CA_FILE_NAME
    ca.cert_pem.write_to_path(str(ca_path))
    return TlsMaterial(context, ca_path, tmpdir)
