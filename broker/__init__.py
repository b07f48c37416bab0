"""token-broker: Azure ML web-service tokens and keys, kept fresh and served locally."""

from __future__ import annotations

__version__ = "0.1.0"
