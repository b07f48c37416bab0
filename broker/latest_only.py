"""Work that must always act on the latest state: one run at a time, and one more run when
it was asked for during a run, so that an older state can never be acted on last."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeAlias

Spawn: TypeAlias = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


def _create_task(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(work, name=name)


class LatestOnly:
    """Runs `job` when asked, never twice at once; asked during a run, it runs once more
    after it. `stop()` starts nothing new; a run under way ends as it will."""

    def __init__(
        self, job: Callable[[], Awaitable[None]], name: str, spawn: Spawn = _create_task
    ) -> None:
        self._job = job
        self._name = name
        self._spawn = spawn
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self.stopped = False

    def ask(self) -> None:
        """Run the job soon: now if it is idle, else once more after the run under way."""
        self._wanted = True
        if not self.stopped and (self._task is None or self._task.done()):
            self._task = self._spawn(self._run(), self._name)

    def stop(self) -> None:
        self.stopped = True

    async def idle(self) -> None:
        """Return once no run is under way or due."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        while self._wanted and not self.stopped:
            self._wanted = False
            await self._job()
