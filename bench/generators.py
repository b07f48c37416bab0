"""wrk (TCP, HTTPS) and h2load (Unix socket) as the load generators of the throughput and
proxy phases, pinned with taskset to the CPU the server is not on.

Both are C programs from Debian's packages (`wrk`, `nghttp2-client`): one thread of either
answers several times what the fastest server here can, where bench/loadgen.py (Python)
saturates before nginx does. The server's CPU time is read from /proc/PID/stat around the
measured window, so that each figure carries the server's CPU µs per request.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGES = {"wrk": "wrk", "h2load": "nghttp2-client", "nginx": "nginx"}
WARMUP_S = 1  # s; wrk takes whole seconds


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pids: list[int]) -> float:
    return sum(proc_cpu_s(p) for p in pids)


def find(tool: str) -> str | None:
    return shutil.which(tool) or (
        f"/usr/sbin/{tool}" if Path(f"/usr/sbin/{tool}").exists() else None
    )


def ensure_tools(install: bool) -> dict[str, str | None]:
    """The tools' paths; with `install`, Debian's packages for the missing ones first."""
    missing = [PACKAGES[t] for t in PACKAGES if find(t) is None]
    if missing and install:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            check=False,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    return {t: find(t) for t in PACKAGES}


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send load: `tcp` (host:port), `https` (host:port) or `unix` (a path)."""

    kind: str
    address: str
    path: str
    headers: tuple[str, ...] = ()
    method: str = "GET"
    body: bytes = b""
    # Each request different from the last (an X-Request-Id counting up): wrk only, as
    # h2load sends the same bytes every time.
    varied: bool = False


def _taskset(cpu: int | None) -> list[str]:
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


# wrk.format's headers replace wrk's own (the -H ones): they are copied in first.
_VARIED = """\
local n = 0
request = function()
  n = n + 1
  local headers = {}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  headers["X-Request-Id"] = tostring(n)
  return wrk.format(nil, nil, headers)
end
"""


def _wrk_script(target: Target, directory: Path) -> list[str]:
    if target.method == "GET" and not target.body and not target.varied:
        return []
    script = directory / "wrk.lua"
    body = target.body.decode().replace("\\", "\\\\").replace('"', '\\"')
    text = f'wrk.method = "{target.method}"\nwrk.body = "{body}"\n'
    script.write_text(text + (_VARIED if target.varied else ""))
    return ["-s", str(script)]


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if m is None:
        raise ValueError(f"wrk latency {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def parse_wrk(out: str) -> dict[str, Any]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)(?:\.000)?%\s+(\S+)", out, re.MULTILINE))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = (int(bad.group(1)) if bad else 0) + (
        sum(int(g) for g in socket_errors.groups()) if socket_errors else 0
    )
    return {
        "rps": rps,
        "requests": total,
        "p50_ms": _ms(pct["50"]),
        "p99_ms": _ms(pct["99"]),
        "errors": errors,
    }


def parse_h2load(out: str, log_file: Path) -> dict[str, Any]:
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
    assert done is not None, out
    codes = re.search(r"status codes: (\d+) 2xx", out)
    durations = sorted(
        int(line.split("\t")[2])
        for line in log_file.read_text().splitlines()
        if line.count("\t") >= 2
    )
    if not durations:
        raise RuntimeError(f"h2load logged no requests:\n{out}")
    q = statistics.quantiles(durations, n=100, method="inclusive")
    return {
        "rps": rps,
        "requests": int(done.group(1)),
        "p50_ms": q[49] / 1000,
        "p99_ms": q[98] / 1000,
        "errors": int(done.group(1)) - (int(codes.group(1)) if codes else 0),
    }


def argv(
    target: Target, connections: int, duration_s: float, cpu: int | None, work: Path
) -> list[str]:
    if target.kind in ("tcp", "https"):
        scheme = "https" if target.kind == "https" else "http"
        return [
            *_taskset(cpu),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{round(duration_s)}s",
            "--latency",
            *(x for h in target.headers for x in ("-H", h)),
            *_wrk_script(target, work),
            f"{scheme}://{target.address}{target.path}",
        ]
    # h2load speaks HTTP/1.1 over the socket with --h1; the URI names the Host and path.
    return [
        *_taskset(cpu),
        "h2load",
        "--h1",
        "-t1",
        f"-c{connections}",
        f"-D{round(duration_s)}",
        f"--warm-up-time={WARMUP_S:g}",
        "-B",
        f"unix:{target.address}",
        "--log-file",
        str(work / "h2load.log"),
        *(x for h in target.headers for x in ("-H", h)),
        f"http://localhost{target.path}",
    ]


async def _run(args: list[str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: exit {proc.returncode}\n{out.decode(errors='replace')}")
    return out.decode()


async def measure(
    target: Target,
    connections: int,
    duration_s: float,
    server_pids: list[int],
    cpu: int | None,
) -> dict[str, Any]:
    """One window of load; req/s, p50/p99, errors, and the server's CPU µs per request."""
    with tempfile.TemporaryDirectory(prefix="tbb-gen-", dir="/tmp") as tmp:
        work = Path(tmp)
        if target.kind != "unix":  # wrk has no warm-up of its own
            await _run(argv(target, connections, WARMUP_S, cpu, work))
        cpu0 = tree_cpu_s(server_pids)
        out = await _run(argv(target, connections, duration_s, cpu, work))
        cpu_s = tree_cpu_s(server_pids) - cpu0
        if target.kind == "unix":
            # h2load's warm-up is inside its run: the CPU window includes it, so count it.
            result = parse_h2load(out, work / "h2load.log")
            served = result["rps"] * (duration_s + WARMUP_S)
        else:
            result = parse_wrk(out)
            served = float(result["requests"])
    result["server_cpu_us_per_request"] = 1e6 * cpu_s / max(served, 1.0)
    result["server_cpu_pct"] = (
        100 * cpu_s / (duration_s + (WARMUP_S if target.kind == "unix" else 0))
    )
    return result
