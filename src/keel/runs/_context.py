"""What a run records about where it ran: code version, Python environment, system metrics."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def _git(args: list[str], cwd: str) -> str | None:
    try:
        p = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):  # no git binary, or it hung
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def code_dir() -> str:
    """The directory of the script being run (else the working directory)."""
    main = sys.modules.get("__main__")
    f = getattr(main, "__file__", None)
    if f and Path(f).exists():
        return str(Path(f).resolve().parent)
    return os.getcwd()


def code_version(path: str | None = None) -> dict[str, Any] | None:
    """``{commit, dirty, branch, root}`` of the git checkout at ``path``; None outside git."""
    cwd = path or code_dir()
    commit = _git(["rev-parse", "HEAD"], cwd)
    if not commit:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=normal"], cwd)
    branch = _git(["rev-parse", "--abbrev-ref", "HEAD"], cwd)
    return {
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "branch": branch if branch and branch != "HEAD" else None,
        "root": _git(["rev-parse", "--show-toplevel"], cwd),
    }


def environment() -> dict[str, Any]:
    """The interpreter and every installed distribution as ``name==version``."""
    seen: dict[str, str] = {}
    for d in importlib.metadata.distributions():
        name = (d.metadata["Name"] or "").strip()
        if name and name.lower() not in seen:
            seen[name.lower()] = f"{name}=={d.version}"
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "packages": sorted(seen.values(), key=str.lower),
    }


class SystemSampler:
    """CPU and memory of this process and host (psutil), GPUs when NVML has any."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._proc.cpu_percent(None)  # the first reading is meaningless; prime it
        psutil.cpu_percent(None)
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self._nvml = pynvml
        except Exception:  # no driver, no library, no device: no GPU metrics
            self._nvml = None

    def sample(self) -> dict[str, float]:
        ps = self._psutil
        with self._proc.oneshot():
            out = {
                "system/cpu_percent": float(self._proc.cpu_percent(None)),
                "system/memory_rss_mb": self._proc.memory_info().rss / 2**20,
            }
        out["system/host_cpu_percent"] = float(ps.cpu_percent(None))
        out["system/host_memory_percent"] = float(ps.virtual_memory().percent)
        if self._nvml is not None:
            nv = self._nvml
            try:
                for i in range(nv.nvmlDeviceGetCount()):
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    out[f"system/gpu{i}_utilization_percent"] = float(
                        nv.nvmlDeviceGetUtilizationRates(h).gpu
                    )
                    out[f"system/gpu{i}_memory_used_mb"] = (
                        nv.nvmlDeviceGetMemoryInfo(h).used / 2**20
                    )
            except Exception:
                self._nvml = None
        return out
