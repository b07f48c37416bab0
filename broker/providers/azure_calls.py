"""One service's calls to ARM or Azure ML, with what every such call needs.

Throttle hold-back before the call (and a 429 recorded for the principal and
subscription, Entra's at sign-in as ARM's), a 403 turned into what the principal lacks
and where, and Azure's clock read from each answer's `Date` so deadlines can be moved
onto ours.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable

from broker.credentials import Credential
from broker.errors import PermissionDeniedError, ThrottledError
from broker.log import get_logger
from broker.models import AccessToken
from broker.providers.throttle import Throttles
from broker.providers.upstream import Reply, Upstream

log = get_logger("broker.providers")

SKEW_TOLERANCE_S = 2.0  # Date has one-second resolution and the answer takes time to arrive


class AzureCalls:
    """The calls of one service, as one principal."""

    def __init__(
        self,
        service: str,
        upstream: Upstream,
        throttles: Throttles,
        principal: str,
        subscription_id: str,
        lacks: Callable[[str], str],
    ) -> None:
        """`lacks(route)` says what a 403 on that route means the principal is missing."""
        self._service = service
        self._upstream = upstream
        self._throttles = throttles
        self.clock = throttles.clock  # the broker's: Azure's Date is compared with it
        self._principal = principal
        self._throttle_key = (principal, subscription_id.lower())
        self._lacks = lacks
        self.clock_skew_s: float | None = None

    async def call(
        self,
        method: str,
        url: str,
        route: str,
        bearer: str | None,
        *,
        what: str = "",
        json_body: object = None,
    ) -> Reply:
        await self._throttles.check(self._throttle_key, route)
        try:
            reply = await self._upstream.call(
                method, url, route=route, bearer=bearer, what=what, json_body=json_body
            )
        except ThrottledError as exc:
            await self._throttles.note(self._throttle_key, exc.retry_after)
            raise
        except PermissionDeniedError as exc:
            raise PermissionDeniedError(
                f"{exc.message}. The principal {self._principal} lacks {self._lacks(route)}",
                status=exc.status,
                route=route,
            ) from None
        self._note_skew(reply)
        return reply

    async def sign_in(self, credential: Credential, scope: str) -> AccessToken:
        """The principal's Entra token for `scope`, held back like any call: Entra's 429
        holds back the principal on this subscription too."""
        await self._throttles.check(self._throttle_key, "entra.token")
        try:
            return await credential.get_token(scope)
        except ThrottledError as exc:
            await self._throttles.note(self._throttle_key, exc.retry_after)
            raise

    def skew_to_apply(self) -> float:
        """The skew to move Azure's times by: none while within what `Date` can tell."""
        skew = self.clock_skew_s or 0.0
        return skew if abs(skew) >= SKEW_TOLERANCE_S else 0.0

    def _note_skew(self, reply: Reply) -> None:
        skew = clock_skew(reply.headers, self.clock())
        if skew is None:
            return
        previous, self.clock_skew_s = self.clock_skew_s, skew
        if abs(skew) >= SKEW_TOLERANCE_S and (
            previous is None or abs(skew - previous) >= SKEW_TOLERANCE_S
        ):
            log.warning(
                "clock.skew_detected",
                service=self._service,
                skew_s=round(skew, 1),
                note="Azure's clock is ahead of ours" if skew > 0 else "ours is ahead of Azure's",
            )


def clock_skew(headers: dict[str, str], now: float) -> float | None:
    """Azure's clock minus ours, from an answer's `Date` header (one-second resolution)."""
    value = headers.get("Date")
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp() - now
    except (TypeError, ValueError):
        return None
