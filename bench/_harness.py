"""Shared pieces of the benchmarks: processes on loopback and a lean HTTP/1.1 client.

The client is a few lines over asyncio streams on purpose: a heavy client on a
2-core machine would steal the CPU the measured server needs, and the same
client is used for the direct and the proxied path, so its own cost cancels out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextlib.contextmanager
def fake_upstream() -> Iterator[int]:
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "keel.testing.fake_upstream", "--port", str(port)])
    try:
        wait_port(port)
        yield port
    finally:
        p.terminate()
        p.wait(10)


@contextlib.contextmanager
def keel_server(config_yaml: str, env: dict[str, str] | None = None) -> Iterator[tuple[int, int]]:
    """Start `keel up` in its own process; yields (port, pid)."""
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "keel.yaml"
        cfg.write_text(config_yaml)
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "keel.cli",
                "up",
                "--port",
                str(port),
                "--config",
                str(cfg),
                "--data-dir",
                str(Path(d) / "data"),
            ],
            env={**os.environ, "KEEL_LOG_LEVEL": "warning", **(env or {})},
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_port(port)
            yield port, p.pid
        finally:
            p.terminate()
            p.wait(30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.r: asyncio.StreamReader
        self.w: asyncio.StreamWriter

    async def open(self) -> Conn:
        self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def post(self, path: str, body: bytes, headers: bytes = b"") -> tuple[int, bytes]:
        """``headers``: extra raw header lines, each ending with CRLF."""
        self.w.write(
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\nHost: bench\r\n"
            + headers
            + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            data = bytearray()
            while True:
                size_line = await self.r.readuntil(b"\r\n")
                n = int(size_line.strip(), 16)
                chunk = await self.r.readexactly(n + 2)
                if n == 0:
                    break
                data += chunk[:-2]
            return status, bytes(data)
        i = lower.index(b"content-length:")
        n = int(lower[i + 15 : lower.index(b"\r\n", i)])
        return status, await self.r.readexactly(n)

    async def post_first_chunk(self, path: str, body: bytes) -> float:
        """Seconds until the first body chunk of a chunked (streamed) response; drains it."""
        t0 = time.perf_counter()
        self.w.write(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        await self.r.readuntil(b"\r\n\r\n")
        first = None
        while True:
            size_line = await self.r.readuntil(b"\r\n")
            n = int(size_line.strip(), 16)
            await self.r.readexactly(n + 2)
            if first is None:
                first = time.perf_counter() - t0
            if n == 0:
                break
        return first or 0.0

    def close(self) -> None:
        self.w.close()


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


@contextlib.contextmanager
def pg_database(admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one benchmark, dropped afterwards; yields its URL."""
    name = f"keel_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                ),
                {"n": name},
            )
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
