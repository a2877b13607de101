"""Where a step's command runs: ``local`` (a subprocess) or ``ray`` (a Ray job).

Both stream the command's output line by line to ``log`` and answer its exit
status. The Ray executor submits the command as a job to an existing cluster
(``ray.job_submission.JobSubmissionClient``) with the step's directory as the
job's working directory, so heavy training runs on the cluster, never in Keel.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from keel.errors import InvalidRequest, KeelError

Log = Callable[[str], None]


class StepTimeout(KeelError):
    status = 504
    type = "step_timeout"


def argv_of(command: str | list[str]) -> list[str]:
    """The argv of a command; a leading ``python`` is the interpreter Keel runs in, so a
    step sees the same packages (keel, numpy…) whatever PATH says."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv


def run_local(
    command: str | list[str], *, cwd: Path, env: dict[str, str], log: Log, timeout_s: float
) -> int:
    """Run the command as a subprocess (stdout and stderr merged, streamed)."""
    argv = argv_of(command)
    try:
        p = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
    except OSError as e:
        raise InvalidRequest(f"cannot start {argv[0]!r}: {e.strerror or e}") from None
    timer = threading.Timer(timeout_s, p.kill)  # a hung step must not hang the pipeline
    timer.start()
    try:
        assert p.stdout is not None
        for line in p.stdout:
            log(line.rstrip("\n"))
        rc = p.wait()
    finally:
        timer.cancel()
    return rc


def run_ray(
    command: str | list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    log: Log,
    timeout_s: float,
    address: str | None = None,
    poll_s: float = 0.5,
) -> int:
    """Submit the command as a Ray job and follow it; 0 when it SUCCEEDED, else 1."""
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient
    except ImportError:
        raise InvalidRequest(
            "the ray executor needs Ray: pip install 'keel[ray]' (or 'ray[default]')"
        ) from None
    addr = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    try:
        client = JobSubmissionClient(addr)
    except Exception as e:  # ConnectionError, or a Ray version mismatch
        raise InvalidRequest(f"cannot reach the Ray cluster at {addr} ({e})") from None
    cmd = command if isinstance(command, str) else shlex.join(command)
    job = client.submit_job(
        entrypoint=cmd,
        runtime_env={"working_dir": str(cwd), "env_vars": {**env, "PYTHONUNBUFFERED": "1"}},
    )
    log(f"submitted Ray job {job} to {addr}")
    deadline = time.monotonic() + timeout_s
    shown = 0
    done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(job)
        logs = client.get_job_logs(job)
        for line in logs[shown:].splitlines():
            log(line)
        shown = len(logs)
        if status in done:
            break
        if time.monotonic() > deadline:
            client.stop_job(job)
            log(f"Ray job {job} stopped after {timeout_s:.0f}s")
            return 124
        time.sleep(poll_s)
    log(f"Ray job {job}: {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def run_command(
    executor: str,
    command: str | list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    log: Log,
    timeout_s: float,
    ray_address: str | None = None,
) -> int:
    """Run with the named executor; the exit status (0 = success)."""
    if executor == "ray":
        return run_ray(command, cwd=cwd, env=env, log=log, timeout_s=timeout_s, address=ray_address)
    return run_local(command, cwd=cwd, env=env, log=log, timeout_s=timeout_s)
