"""The proxy's scoring host: nginx over HTTPS with a test certificate, answering every
request with one fixed JSON body, so that `/v1/proxy/{service}` can be measured against
the same requests sent straight to it.

nginx, not the emulator's scoring endpoint, because the emulator runs in the benchmark's
own process on the generator's CPU: as a scoring host it would be slower than the proxy in
front of it, and the added latency would be lost in its own. nginx on the server's CPU
answers in tens of microseconds; what the proxy adds stands out against it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SCORE_BODY = b'{"result": [0.125, 0.5, 0.875], "model": "bench"}'
REQUEST_BODY = b'{"data": [[1.0, 2.0, 3.0]]}'


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def test_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf for 127.0.0.1 it signed: (ca.pem, leaf.pem, leaf-key.pem)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("token-broker bench CA"))
        .issuer_name(_name("token-broker bench CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "leaf.pem", directory / "leaf-key.pem")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def nginx_scoring_conf(directory: Path, port: int, leaf: Path, key: Path) -> Path:
    """One worker, HTTPS on 127.0.0.1:`port`, `SCORE_BODY` for every method and path."""
    (directory / "score.json").write_bytes(SCORE_BODY)
    user = "user root;" if os.geteuid() == 0 else ""
    conf = directory / "nginx-scoring.conf"
    conf.write_text(f"""\
{user}
worker_processes 1;
daemon off;
master_process on;
pid {directory}/nginx-scoring.pid;
error_log {directory}/nginx-scoring-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  client_body_buffer_size 64k;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {leaf};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.3;
    default_type application/json;
    location / {{ return 200 '{SCORE_BODY.decode()}'; }}
  }}
}}
""")
    return conf
