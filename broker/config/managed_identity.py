"""The `[compat]` table: managed-identity compatible routes for unmodified Azure SDKs.

`imds = true` serves Azure's instance metadata protocol; `app_service_header_file`
serves App Service's, with the identity header read from that file — a secret the
operator generates and shares with its clients, never a constant. Only resources on
the `resources` allowlist are served, as the principal of `identity`.
"""

from __future__ import annotations

import re
from pathlib import Path

from broker.config.model import CompatConfig, Secret
from broker.config.reader import Sources, Table, quote

_RESOURCE = re.compile(r"(https://|api://)[^\s/?#]+(/[^\s?#]*)?")


def compat(root: Table, sources: Sources, identity_names: list[str]) -> CompatConfig:
    table = root.table("compat")
    table.known("imds", "app_service_header_file", "resources", "identity")
    imds = table.flag("imds", False)
    header_path = table.file_path("app_service_header_file", sources.base)
    if not (imds or header_path):
        return CompatConfig()
    resources = _resources(table)
    identity = _identity(table, identity_names)
    header = _header(table, header_path) if header_path else None
    return CompatConfig(imds, header, tuple(resources), identity, str(header_path or ""))


def _resources(table: Table) -> list[str]:
    found = []
    for index, item in enumerate(table.array("resources", '["https://ml.azure.com"]')):
        if not isinstance(item, str) or not _RESOURCE.fullmatch(item):
            table.problem(
                ("resources", index),
                f"resources[{index + 1}] is not a resource URI",
                'write resources like "https://ml.azure.com" (no /.default)',
            )
            continue
        found.append(item.rstrip("/"))
    if not found:
        table.problem(
            "resources",
            "no resource is allowed, so the compatible routes would refuse everything",
            'list the resources SDK clients may ask for, e.g. resources = ["https://ml.azure.com"]',
        )
    return found


def _identity(table: Table, identity_names: list[str]) -> str:
    name = table.optional_text("identity")
    if name is None:
        if len(identity_names) > 1:
            table.problem(
                "identity",
                "several identities are defined and [compat] names none",
                f"add identity = NAME with one of: {', '.join(identity_names)}",
            )
        return identity_names[0] if identity_names else ""
    if name not in identity_names:
        table.problem(
            "identity",
            f"no identity named {quote(name)}",
            f"use one of: {', '.join(identity_names)}",
        )
    return name


def _header(table: Table, path: Path) -> Secret | None:
    data = table.readable("app_service_header_file", path)
    if data is None:
        return None
    value = data.decode("utf-8", "replace").strip()
    if len(value) < 16:
        table.problem(
            "app_service_header_file",
            f"{path} holds fewer than 16 characters; the identity header is a secret",
            f"make one with: head -c 32 /dev/urandom | base64 > {path}",
        )
        return None
    return Secret(value)
