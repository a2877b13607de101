"""How long a deployment route change takes to reach every gateway replica.

N real `keel up` processes share one PostgreSQL store (the scale-out setup;
each runs the gateway and its route sync). Each trial writes a route change
for the alias `gpt` (its stable side alternates between upstream models
`fake-a` and `fake-b`) straight into the store, the way a promotion or a
rollback does, and then calls every replica through the gateway every few
milliseconds until its answer comes from the new upstream model. A trial's
propagation time is the slowest replica's. Target: ≤ 5 s with the default
`deploy.route_poll_interval_s` (1 s).

    python bench/route_propagation.py [--replicas 1,2,4] [--trials 20] [--poll 1.0]
                                      [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Conn, fake_upstream, keel_server, pg_database, table
from keel.deploy.model import Target
from keel.deploy.store import DeployStore, RouteChange
from keel.store.engine import make_engine, migrate

BODY = orjson.dumps({"model": "gpt", "messages": [{"role": "user", "content": "which?"}]})
PROBE_EVERY_S = 0.01


def config(fake_port: int, poll_s: float) -> str:
    return f"""
local: {{enabled: false}}
providers:
  fake: {{kind: openai, base_url: "http://127.0.0.1:{fake_port}/v1"}}
models:
  gpt: fake/fake
deploy:
  route_poll_interval_s: {poll_s}
"""


async def served(conn: Conn) -> str:
    status, body = await conn.post("/v1/chat/completions", BODY)
    if status != 200:
        return f"HTTP {status}"
    return orjson.loads(body)["model"]


async def until_served(conn: Conn, want: str, t0: float, deadline_s: float) -> float:
    while time.perf_counter() - t0 < deadline_s:
        if await served(conn) == want:
            return time.perf_counter() - t0
        await asyncio.sleep(PROBE_EVERY_S)
    return float("inf")


async def trials(ports: list[int], store: DeployStore, n: int) -> list[float]:
    conns = [await Conn(p).open() for p in ports]
    out = []
    for i in range(n):
        upstream = "fake-a" if i % 2 == 0 else "fake-b"
        t = Target("bench", i + 1, "provider", upstream, provider="fake")
        # Replicas poll on their own clocks: start trials at varied phases.
        await asyncio.sleep(0.137 * (i % 7))
        t0 = time.perf_counter()
        await asyncio.to_thread(store.set_route, RouteChange("gpt", "bench", t), actor="bench")
        times = await asyncio.gather(*(until_served(c, upstream, t0, 30.0) for c in conns))
        out.append(max(times))
    for c in conns:
        c.w.close()
    return out


def run(replicas: int, n: int, poll_s: float, pg_admin: str) -> list[float]:
    with pg_database(pg_admin) as url, fake_upstream() as fport, contextlib.ExitStack() as stack:
        engine = make_engine(url)
        migrate(engine)
        ports = [
            stack.enter_context(keel_server(config(fport, poll_s), {"KEEL_DATABASE_URL": url}))[0]
            for _ in range(replicas)
        ]
        return asyncio.run(trials(ports, DeployStore(engine), n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", default="1,2,4")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--poll", type=float, default=1.0, help="deploy.route_poll_interval_s")
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    a = ap.parse_args()
    rows = []
    for n in (int(x) for x in a.replicas.split(",")):
        times = sorted(run(n, a.trials, a.poll, a.pg))
        p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
        rows.append(
            [
                n,
                a.trials,
                f"{statistics.median(times):.2f}",
                f"{p95:.2f}",
                f"{times[-1]:.2f}",
                "✓" if times[-1] <= 5.0 else "✗",
            ]
        )
        print(f"replicas={n}: {', '.join(f'{t:.2f}' for t in times)}", file=sys.stderr)
    print(f"route_poll_interval_s = {a.poll:g}, probe every {PROBE_EVERY_S * 1000:.0f} ms")
    print(table(["replicas", "trials", "p50 s", "p95 s", "max s", "max ≤ 5 s"], rows))


if __name__ == "__main__":
    main()
