"""The persisted cache follows the store, scoring URIs included."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import log
from broker.cache import PersistedCache, PersistedSync, Store
from broker.models import AccessToken, AuthKind
from tests.unit.fakes import FakeClock, FakeProvider

pytestmark = pytest.mark.timeout(5)

KEY = bytes(range(32))
VALUE = "saver-key-VALUE-0001"
URI = "https://fraud.example/api/v1/service/fraud/score"
MOVED = "https://fraud-2.example/api/v1/service/fraud/score"


class DescribedProvider(FakeProvider):
    """A fake provider whose scoring URI a restore may set, as the Azure ML ones do."""

    def restore_scoring_uri(self, uri: str) -> None:
        self.scoring_uri = uri  # type: ignore[assignment]


@pytest.fixture(autouse=True)
def forget_value() -> Iterator[None]:
    """Restored values are registered process-wide; each test ends without them."""
    yield
    log.forget_secret(VALUE)


class Broker:
    """One service's store and its saver, as a broker process holds them."""

    def __init__(self, path: Path, provider: FakeProvider) -> None:
        clock = FakeClock()
        self.provider = provider
        self.store = Store([provider], clock=clock)
        cache = PersistedCache(path, KEY, clock=clock)
        self.saver = PersistedSync(self.store, cache, lambda _: "same-definition")

    async def fetch(self, scoring_uri: str | None) -> None:
        """One successful fetch of the same key, the provider described at `scoring_uri`."""
        self.provider.scoring_uri = scoring_uri  # type: ignore[assignment]
        self.provider.outcomes.append(AccessToken(VALUE, AuthKind.KEY, None))
        await self.store.fetch(self.provider.service)
        await self.saver.close()


async def test_a_restore_gives_the_provider_its_saved_scoring_uri(tmp_path: Path) -> None:
    """The scoring URI saved before a restart is back in the provider before any fetch."""
    await Broker(tmp_path / "cache.bin", DescribedProvider("fraud")).fetch(URI)

    after = DescribedProvider("fraud")
    assert Broker(tmp_path / "cache.bin", after).saver.restore() == 1
    assert after.scoring_uri == URI and after.calls == 0


async def test_a_provider_without_scoring_uris_is_restored_all_the_same(tmp_path: Path) -> None:
    """A provider that takes no scoring URI (an Entra scope) gets its credential back."""
    await Broker(tmp_path / "cache.bin", DescribedProvider("fraud")).fetch(URI)

    after = FakeProvider("fraud")
    assert Broker(tmp_path / "cache.bin", after).saver.restore() == 1
    assert after.scoring_uri is None


async def test_a_new_scoring_uri_is_saved_even_with_the_same_credential(tmp_path: Path) -> None:
    """A service redeployed elsewhere with the same key: the cache learns the new URI."""
    first = Broker(tmp_path / "cache.bin", DescribedProvider("fraud"))
    await first.fetch(URI)
    await first.fetch(MOVED)

    after = DescribedProvider("fraud")
    assert Broker(tmp_path / "cache.bin", after).saver.restore() == 1
    assert after.scoring_uri == MOVED
