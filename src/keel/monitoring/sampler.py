"""The resource sampler: CPU, memory, connections, event-loop lag, GPU (NVML).

Runs on every replica (each samples its own process), exports gauges to
``/metrics`` and stores one row per sample in ``resource_samples``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import psutil
from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import insert
from sqlalchemy.engine import Engine

from keel.daemon import INSTANCE_ID, Daemon, now_ms
from keel.store.tables import resource_samples

log = logging.getLogger("keel.sampler")


class GPUReader:
    """NVML through nvidia-ml-py; ``available`` is False (with a reason) without a GPU."""

    def __init__(self) -> None:
        self.available = False
        self.reason: str | None = None
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.count = pynvml.nvmlDeviceGetCount()
            self.available = self.count > 0
            if not self.available:
                self.reason = "NVML reports no devices"
        except Exception as e:  # no driver, no library, no device
            self.reason = f"no GPU: {type(e).__name__}: {e}"[:200]

    def read(self) -> list[dict[str, Any]] | None:
        if not self.available:
            return None
        nv = self._nvml
        out = []
        for i in range(self.count):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            util = nv.nvmlDeviceGetUtilizationRates(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            name = nv.nvmlDeviceGetName(h)
            out.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "utilization_percent": float(util.gpu),
                    "memory_used_bytes": int(mem.used),
                    "memory_total_bytes": int(mem.total),
                }
            )
        return out


class ResourceSampler(Daemon):
    name = "resource-sampler"
    singleton = False  # every replica samples itself

    def __init__(
        self,
        engine: Engine,
        registry: CollectorRegistry,
        *,
        interval_s: float,
        recorder: Any = None,
        gpu: GPUReader | None = None,
    ) -> None:
        super().__init__(engine)
        self.interval_s = interval_s
        self.recorder = recorder
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)  # prime: the first call always returns 0
        psutil.cpu_percent(None)
        self.gpu = gpu or GPUReader()
        self.loop_lag_ms = 0.0
        self.last: dict[str, Any] = {}
        g = lambda n, d, labels=(): Gauge(n, d, list(labels), registry=registry)  # noqa: E731
        self.g_proc_cpu = g("keel_process_cpu_percent", "CPU of this process (100 = one core).")
        self.g_host_cpu = g("keel_host_cpu_percent", "CPU of the host, all cores (0-100).")
        self.g_rss = g("keel_process_resident_memory_bytes", "Resident memory of this process.")
        self.g_mem_used = g("keel_host_memory_used_bytes", "Memory used on the host.")
        self.g_mem_total = g("keel_host_memory_total_bytes", "Memory of the host.")
        self.g_conns = g("keel_process_open_connections", "Open network connections.")
        self.g_lag = g("keel_event_loop_lag_seconds", "How late the event loop ran a timer.")
        self.g_gpu_present = g("keel_gpu_present", "1 when NVML found a GPU, else 0.")
        self.g_gpu_util = g("keel_gpu_utilization_percent", "GPU utilisation.", ["gpu"])
        self.g_gpu_mem = g("keel_gpu_memory_used_bytes", "GPU memory used.", ["gpu"])
        self.g_gpu_mem_total = g("keel_gpu_memory_total_bytes", "GPU memory.", ["gpu"])
        self.g_gpu_present.set(1 if self.gpu.available else 0)

    async def _measure_lag(self) -> float:
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        return max(0.0, (time.perf_counter() - t0 - 0.01) * 1000)

    def sample(self) -> dict[str, Any]:
        """One reading (blocking: psutil and NVML)."""
        vm = psutil.virtual_memory()
        try:
            conns = len(self.proc.net_connections(kind="inet"))
        except (psutil.Error, OSError):
            conns = None
        gpus = None
        try:
            gpus = self.gpu.read()
        except Exception as e:
            log.debug("GPU read failed: %s", e)
        stats = self.recorder.stats if self.recorder is not None else None
        return {
            "ts_ms": now_ms(),
            "instance": INSTANCE_ID,
            "process_cpu_percent": self.proc.cpu_percent(None),
            "host_cpu_percent": psutil.cpu_percent(None),
            "process_rss_bytes": self.proc.memory_info().rss,
            "host_mem_used_bytes": vm.total - vm.available,
            "host_mem_total_bytes": vm.total,
            "open_connections": conns,
            "loop_lag_ms": self.loop_lag_ms,
            "gpu": orjson.dumps(gpus).decode() if gpus else None,
            "recorder_queue_depth": self.recorder.queue_depth if self.recorder else None,
            "recorder_spilled": stats.spilled if stats else None,
            "recorder_dropped": stats.dropped if stats else None,
        }

    def _export(self, s: dict[str, Any], gpus: list[dict[str, Any]] | None) -> None:
        self.g_proc_cpu.set(s["process_cpu_percent"])
        self.g_host_cpu.set(s["host_cpu_percent"])
        self.g_rss.set(s["process_rss_bytes"])
        self.g_mem_used.set(s["host_mem_used_bytes"])
        self.g_mem_total.set(s["host_mem_total_bytes"])
        if s["open_connections"] is not None:
            self.g_conns.set(s["open_connections"])
        self.g_lag.set(s["loop_lag_ms"] / 1000)
        for gpu in gpus or ():
            idx = str(gpu["index"])
            self.g_gpu_util.labels(idx).set(gpu["utilization_percent"])
            self.g_gpu_mem.labels(idx).set(gpu["memory_used_bytes"])
            self.g_gpu_mem_total.labels(idx).set(gpu["memory_total_bytes"])

    def _store(self, s: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(insert(resource_samples), [s])

    async def tick(self) -> None:
        self.loop_lag_ms = await self._measure_lag()
        s = await asyncio.to_thread(self.sample)
        self.last = s
        self._export(s, orjson.loads(s["gpu"]) if s["gpu"] else None)
        await asyncio.to_thread(self._store, s)
