"""Credentials handed out other than by request: copied into files, with a command run after.
Beside the server in the data flow: both take what the store holds and give it out."""

from __future__ import annotations

from broker.delivery.file_sinks import CommandResult, Delivery, FileSinks, WriteRetry

__all__ = ["CommandResult", "Delivery", "FileSinks", "WriteRetry"]
