"""The framework's ceiling: a bare aiohttp app answering every GET with the same JSON.

It serialises a dict per request with `web.json_response`, as performance.md's reference
does, and listens on loopback TCP and a Unix socket like the broker.

    python bench/refserver.py BODY.json PORT SOCKET_PATH [uvloop|asyncio]

The last argument is the event loop, the broker's own in the same run (default asyncio).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from aiohttp import web


async def serve(body: dict[str, object], port: int, sock: str) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await web.UnixSite(runner, sock).start()
    print("listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    main = serve(json.loads(Path(sys.argv[1]).read_text()), int(sys.argv[2]), sys.argv[3])
    if sys.argv[4:5] == ["uvloop"]:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.run(main)
