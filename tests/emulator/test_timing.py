"""Where the emulator puts time: refreshAfter placements in MMS tokens, and the Date
header read from the emulator's own clock."""

from __future__ import annotations

from email.utils import parsedate_to_datetime

import aiohttp
import pytest

from broker.emulator import EmulatorState
from tests.emulator.conftest import AKS, MMS_PATH, REGION, RG, SUB, TENANT, WS, FakeClock, bearer

pytestmark = pytest.mark.timeout(15)

TOKEN_PATH = f"{MMS_PATH}/services/{AKS}/token"


async def _token(http: aiohttp.ClientSession, arm_token: str) -> dict[str, object]:
    async with http.post(TOKEN_PATH, headers=bearer(arm_token)) as resp:
        assert resp.status == 200
        body: dict[str, object] = await resp.json()
        return body


@pytest.mark.parametrize(
    ("placement", "offset"),
    [("normal", 20), ("past", -60), ("after_expiry", 100 + 60), ("absent", None)],
)
async def test_refresh_after_placement(
    http: aiohttp.ClientSession,
    arm_token: str,
    state: EmulatorState,
    clock: FakeClock,
    placement: str,
    offset: int | None,
) -> None:
    """refreshAfter lands at issue + offset, before issue, after expiry, or is left out."""
    state.set_token_lifetime(100, refresh_after_s=20, placement=placement)
    body = await _token(http, arm_token)
    assert body["expiryOn"] == clock.now + 100
    if offset is None:
        assert "refreshAfter" not in body
    else:
        assert body["refreshAfter"] == clock.now + offset
        assert isinstance(body["refreshAfter"], int)


async def test_placement_can_target_one_service(
    http: aiohttp.ClientSession, arm_token: str, state: EmulatorState, clock: FakeClock
) -> None:
    """set_token_lifetime(service=…) changes that service only and says how many changed."""
    assert state.set_token_lifetime(100, service="no-such", placement="absent") == 0
    assert "refreshAfter" in await _token(http, arm_token)
    assert state.set_token_lifetime(100, service=AKS.upper(), placement="past") == 1
    assert (await _token(http, arm_token))["refreshAfter"] == clock.now - 60


def test_unknown_placement_is_refused(state: EmulatorState) -> None:
    """A placement outside PLACEMENTS is a ValueError, for lifetimes and new services."""
    with pytest.raises(ValueError, match="placement"):
        state.set_token_lifetime(60, placement="later")
    with pytest.raises(ValueError, match="placement"):
        state.add_web_service(SUB, RG, WS, "svc-new", refresh_placement="later")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/regions/{REGION}/discovery"),
        ("GET", "/no/such/route"),
        ("GET", "/_emulator/info"),
        ("POST", f"/{TENANT}/oauth2/v2.0/token"),
    ],
)
async def test_date_header_follows_the_emulator_clock(
    http: aiohttp.ClientSession, clock: FakeClock, method: str, path: str
) -> None:
    """Every answer, errors included, has one Date header: the emulator's skewed time."""
    clock.advance(600)
    async with http.request(method, path) as resp:
        dates = resp.headers.getall("Date")
    assert len(dates) == 1
    assert parsedate_to_datetime(dates[0]).timestamp() == clock.now


async def test_date_header_on_injected_faults(
    http: aiohttp.ClientSession, state: EmulatorState, clock: FakeClock
) -> None:
    """Fault answers carry the emulator's Date too."""
    clock.advance(-3600)
    state.fail("discovery", status=503, times=1)
    async with http.get(f"/regions/{REGION}/discovery") as resp:
        assert resp.status == 503
        assert parsedate_to_datetime(resp.headers["Date"]).timestamp() == clock.now
