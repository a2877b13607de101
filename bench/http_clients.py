"""Why the upstream client is aiohttp: CPU per request of httpx vs aiohttp.

Both clients POST the same chat body to the fake upstream (its own process) over
16 concurrent keep-alive connections; the CPU time of this process is divided by
the number of requests. Run twice, interleaved.

    python bench/http_clients.py [--requests 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import orjson
import uvloop

sys.path.insert(0, str(Path(__file__).parent))
from _harness import fake_upstream, table

BODY = orjson.dumps({"model": "fake", "messages": [{"role": "user", "content": "hello " * 40}]})
CONC = 16


async def with_httpx(port: int, n: int) -> None:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(limits=limits) as c:

        async def worker() -> None:
            for _ in range(n // CONC):
                r = await c.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    content=BODY,
                    headers={"content-type": "application/json"},
                )
                orjson.loads(r.content)

        await asyncio.gather(*(worker() for _ in range(CONC)))


async def with_aiohttp(port: int, n: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512)) as s:

        async def worker() -> None:
            for _ in range(n // CONC):
                async with s.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    data=BODY,
                    headers={"content-type": "application/json"},
                ) as r:
                    orjson.loads(await r.read())

        await asyncio.gather(*(worker() for _ in range(CONC)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=4000)
    n = ap.parse_args().requests
    results: dict[str, list[float]] = {"httpx": [], "aiohttp": []}
    with fake_upstream() as port:
        for name, fn in [("httpx", with_httpx), ("aiohttp", with_aiohttp)] * 2:
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            uvloop.run(fn(port, n))
            wall = time.perf_counter() - t0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            used = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
            results[name].append((used / n * 1e6, n / wall))
    rows = [[k, f"{min(v)[0]:.0f}", f"{max(x[1] for x in v):,.0f}"] for k, v in results.items()]
    print(f"upstream HTTP client, {n} requests, {CONC} connections (best of 2)")
    print(table(["client", "CPU µs/request", "req/s"], rows))


if __name__ == "__main__":
    main()
