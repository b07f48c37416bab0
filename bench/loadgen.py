"""A small HTTP/1.1 keep-alive load generator over loopback TCP or a Unix socket.

Each connection sends one pre-built GET, waits for the whole answer (Content-Length
framed), records the latency and sends the next: closed-loop, like wrk and h2load.
Written on asyncio protocols (not streams) so that the generator stays cheaper per
request than the server it measures; uvloop is used when installed.

    python bench/loadgen.py --unix /tmp/x.sock --connections 16 --duration 5 \
        --path /v1/token/a --header 'Metadata: true' [--cpu 0] [--timeline FILE]

Prints one JSON object: requests, errors (non-2xx), rps, latency percentiles (ms), and
the generator's own CPU use. `--timeline FILE` also writes (completion time, latency)
pairs as float64 for analyses by time window.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import functools
import json
import os
import resource
import sys
import time


class Client(asyncio.Protocol):
    """One keep-alive connection that sends its request again as soon as the answer ends."""

    def __init__(self, requests: list[bytes], stats: Stats, index: int) -> None:
        self.requests = requests
        self.stats = stats
        self.next = index
        self.buf = b""
        self.need = -1
        self.sent = 0.0
        self.status_ok = True
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        req = self.requests[self.next % len(self.requests)]
        self.next += 1
        self.sent = time.perf_counter()
        assert self.transport is not None
        self.transport.write(req)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            if self.need < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    self.buf = buf
                    return
                head = buf[:end].lower()
                at = head.find(b"content-length:")
                length = 0
                if at >= 0:
                    stop = head.find(b"\r\n", at)
                    length = int(head[at + 15 : stop if stop > 0 else None])
                self.status_ok = head[9:10] == b"2"
                self.need = end + 4 + length
            if len(buf) < self.need:
                self.buf = buf
                return
            buf = buf[self.need :]
            self.need = -1
            self.stats.done(self.sent, self.status_ok)
            if self.stats.stopping:
                self.buf = b""
                assert self.transport is not None
                self.transport.close()
                return
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class Stats:
    def __init__(self, timeline: bool) -> None:
        self.latencies = array.array("d")
        self.ends = array.array("d") if timeline else None
        self.errors = 0
        self.recording = False
        self.stopping = False

    def done(self, sent: float, ok: bool) -> None:
        if not self.recording:
            return
        now = time.perf_counter()
        self.latencies.append(now - sent)
        if self.ends is not None:
            self.ends.append(now)
        if not ok:
            self.errors += 1


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    host = "localhost" if args.unix else args.tcp.split(":")[0]
    headers = "".join(f"{h}\r\n" for h in args.header)
    requests = [f"GET {p} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode() for p in _paths(args)]
    stats = Stats(args.timeline is not None)
    clients = []
    for i in range(args.connections):
        if args.unix:
            _, proto = await loop.create_unix_connection(
                functools.partial(Client, requests, stats, i), args.unix
            )
        else:
            h, port = args.tcp.rsplit(":", 1)
            _, proto = await loop.create_connection(
                functools.partial(Client, requests, stats, i), h, int(port)
            )
        clients.append(proto)
    await asyncio.sleep(args.warmup)
    cpu0 = _cpu()
    wall0 = time.perf_counter()
    wall_epoch0 = time.time()
    stats.recording = True
    await asyncio.sleep(args.duration)
    stats.recording = False
    wall = time.perf_counter() - wall0
    cpu = _cpu() - cpu0
    stats.stopping = True
    await asyncio.wait([c.lost for c in clients], timeout=2)
    lat = sorted(stats.latencies)
    if args.timeline and stats.ends is not None:
        # Completion times as epoch seconds, so the caller can line them up with its own.
        offset = wall_epoch0 - wall0
        with open(args.timeline, "wb") as f:
            array.array("d", (t + offset for t in stats.ends)).tofile(f)
            stats.latencies.tofile(f)
    return {
        "requests": len(lat),
        "errors": stats.errors,
        "duration_s": wall,
        "rps": len(lat) / wall,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p90_ms": percentile(lat, 90) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "max_ms": (lat[-1] * 1e3) if lat else float("nan"),
        "generator_cpu_pct": 100 * cpu / wall,
    }


def _paths(args: argparse.Namespace) -> list[str]:
    if args.paths_file:
        with open(args.paths_file) as f:
            return [line.strip() for line in f if line.strip()]
    paths: list[str] = args.path
    return paths


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--tcp", help="HOST:PORT")
    target.add_argument("--unix", help="socket path")
    p.add_argument("--connections", "-c", type=int, default=16)
    p.add_argument("--duration", "-d", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--path", action="append", default=[])
    p.add_argument("--paths-file")
    p.add_argument("--header", action="append", default=[])
    p.add_argument("--cpu", type=int, help="pin the generator to this CPU")
    p.add_argument("--timeline", help="write completion times and latencies here")
    args = p.parse_args()
    if not args.path and not args.paths_file:
        args.path = ["/"]
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    try:
        import uvloop

        uvloop.install()
        loop_name = "uvloop"
    except ImportError:
        loop_name = "asyncio"
    result = asyncio.run(run(args))
    result["loop"] = loop_name
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
