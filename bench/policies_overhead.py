"""What the gateway policies add: virtual key, rate limits, budgets (Redis), redaction.

Two Keel processes on loopback in front of the same zero-delay fake upstream:
a bare one, and one with every policy on — keys required (the call carries a
key with RPM, TPM and a budget), Redis-backed limits and budgets, a global and
a per-user budget, prices, and `capture: redacted` for the alias. Requests go to
both, alternating, one at a time.

    python bench/policies_overhead.py [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).parent))
from _harness import Conn, fake_upstream, keel_server, pct, table

BODY = orjson.dumps(
    {
        "model": "fake",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write to jane.doe@example.com about order 1234. " * 3},
        ],
    }
)


def bare(up: int) -> str:
    return f"""
local: {{enabled: false}}
providers:
  fake: {{kind: openai, base_url: "http://127.0.0.1:{up}/v1"}}
models:
  fake: fake/fake
"""


def with_policies(up: int, db: str) -> str:
    return f"""
database_url: "sqlite:///{db}"
redis_url: "redis://127.0.0.1:6379/0"
local: {{enabled: false}}
auth: {{enabled: "on"}}
providers:
  fake: {{kind: openai, base_url: "http://127.0.0.1:{up}/v1"}}
models:
  fake: {{deployments: [{{provider: fake, model: fake}}], rpm: 10000000, tpm: 100000000,
          capture: redacted}}
prices:
  - {{provider: fake, model: fake, input_per_mtok: 1.0, output_per_mtok: 2.0}}
budgets:
  - {{name: all, scope: global, limit_usd: 1000000}}
  - {{name: per-user, scope: user, limit_usd: 1000000}}
"""


async def measure(bp: int, pp: int, key: str, n: int) -> dict[str, list[float]]:
    import time

    b, p = await Conn(bp).open(), await Conn(pp).open()
    auth = f"Authorization: Bearer {key}\r\nX-Keel-User: bench\r\n".encode()
    out: dict[str, list[float]] = {"bare": [], "policies": []}
    for _ in range(200):
        await b.post("/v1/chat/completions", BODY)
        await p.post("/v1/chat/completions", BODY, auth)
    for i in range(n):
        pairs = [(b, "bare", b""), (p, "policies", auth)]
        if i % 2:
            pairs.reverse()
        for conn, name, hdr in pairs:
            t0 = time.perf_counter()
            status, body = await conn.post("/v1/chat/completions", BODY, hdr)
            out[name].append(time.perf_counter() - t0)
            assert status == 200, (status, body[:300])
    b.close()
    p.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, fake_upstream() as up:
        db = f"{d}/policies.db"
        cfg = Path(d) / "keel.yaml"
        cfg.write_text(with_policies(up, db))
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "keel.cli",
                "keys",
                "create",
                "--config",
                str(cfg),
                "--name",
                "bench",
                "--rpm",
                "10000000",
                "--tpm",
                "100000000",
                "--budget-usd",
                "1000000/month",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        key = next(w for w in res.stdout.split() if w.startswith("sk-keel-"))
        with keel_server(bare(up)) as (bp, _), keel_server(with_policies(up, db)) as (pp, _):
            r = asyncio.run(measure(bp, pp, key, a.requests))
    ms = lambda v: f"{v * 1000:.3f}"  # noqa: E731
    rows = [
        [
            f"p{int(q * 100)} (ms)",
            ms(pct(r["bare"], q)),
            ms(pct(r["policies"], q)),
            ms(pct(r["policies"], q) - pct(r["bare"], q)),
        ]
        for q in (0.5, 0.9, 0.99)
    ]
    print(
        f"policies overhead: {a.requests} sequential pairs; key + Redis limits + budgets + "
        "prices + redaction"
    )
    print(table(["latency", "bare Keel", "Keel with policies", "added"], rows))


if __name__ == "__main__":
    main()
