"""A credential as it is handed out: the JSON body and the header line of
`GET /v1/token/{service}`, which file sinks write byte for byte too."""

from __future__ import annotations

import json

from broker.cache.store import Entry, Store


class Rendered:
    """The bytes handed out for one credential, built once per credential (`generation`)."""

    __slots__ = ("generation", "header", "json", "value")

    def __init__(self, store: Store, entry: Entry) -> None:
        token = entry.token
        assert token is not None, "only an entry holding a credential is rendered"
        self.generation = entry.generation
        self.json = json.dumps(
            {
                "service": entry.service,
                "token_type": token.token_type,
                "access_token": token.value,
                "expires_on": _whole(token.expires_on),
                "refresh_by": _whole(store.refresh_by(entry)),
                "auth": token.auth.value,
            }
        ).encode()
        self.header = f"{token.token_type} {token.value}\n".encode()
        self.value = token.value.encode()


def _whole(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds)
