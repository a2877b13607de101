"""``keel.run``: track a training or evaluation run from inside the process doing it.

    import keel

    with keel.run("finetune", params={"lr": 3e-4, "epochs": 3}) as run:
        run.log_dataset("support-chats@1f2e")
        for step in range(steps):
            run.log_metric("loss", loss, step=step)
        run.log_artifact("out/adapter")            # a file or a whole directory

Everything goes through Keel's REST API (``/api/runs``), never to the database
directly: a training process on a remote worker (a Ray job, a GPU box) can
reach Keel's address but usually not its database, and the API applies keys,
roles and size limits in one place. The environment decides where:

- ``KEEL_URL`` (default http://127.0.0.1:4000) and ``KEEL_API_KEY``;
- ``KEEL_RUN_ID``: attach to a run a pipeline step created (it goes from
  ``pending`` to ``running``; name and params passed here are added to it);
- ``KEEL_EXPERIMENT``, ``KEEL_PIPELINE_RUN_ID``: recorded on a new run.

Metric points are buffered and sent in batches by a background thread, which
also samples CPU/memory (and GPUs) as ``system/*`` metrics. Starting a run
fails loudly when Keel is unreachable; after that a failed batch is kept and
sent again, and finishing never raises over the training's own outcome.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

from keel.errors import InvalidRequest, KeelError
from keel.runs._client import DEFAULT_URL, ApiClient
from keel.runs._context import SystemSampler, code_version, environment
from keel.runs._keys import check_key

log = logging.getLogger("keel.runs")

MAX_BATCH = 5000
MAX_BUFFER = 1_000_000  # points kept while Keel is unreachable; newer ones are dropped


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Run:
    """A tracked run. Made by :func:`run`; use it as a context manager or call :meth:`end`.

    ``params``/``tags``: recorded at start. ``experiment``: groups runs (default
    ``$KEEL_EXPERIMENT``). ``run_id``: attach to an existing run (default
    ``$KEEL_RUN_ID``). ``url``/``api_key``: default ``$KEEL_URL``/``$KEEL_API_KEY``.
    ``system_metrics``: sample CPU/memory/GPU every ``system_interval_s`` (and once
    at the end). ``flush_interval_s``: how often buffered points are sent.
    ``capture_code``/``capture_environment``: git commit + dirty flag, and the
    installed packages. ``retries``: attempts after a connection error or 502-504.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
        experiment: str | None = None,
        run_id: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        system_metrics: bool = True,
        system_interval_s: float = 10.0,
        flush_interval_s: float = 2.0,
        capture_code: bool = True,
        capture_environment: bool = True,
        retries: int = 3,
    ) -> None:
        env = os.environ
        self.url = (url or env.get("KEEL_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else env.get("KEEL_API_KEY")
        self.api = ApiClient(self.url, key, retries=retries)
        self.id: str = run_id or env.get("KEEL_RUN_ID") or ""
        self.attached = bool(self.id)
        self.name = name
        self.status = "new"
        self._init = {
            "params": params or {},
            "tags": tags or {},
            "experiment": experiment or env.get("KEEL_EXPERIMENT") or None,
            "pipeline_run_id": env.get("KEEL_PIPELINE_RUN_ID") or None,
            "code": capture_code,
            "environment": capture_environment,
        }
        self._system = system_metrics
        self._system_interval = max(0.05, system_interval_s)
        self._flush_interval = max(0.05, flush_interval_s)
        self._buf: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one sender at a time: a batch is sent once
        self._steps: dict[str, int] = {}
        self._dropped = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampler: SystemSampler | None = None
        self._system_step = 0

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Run:
        """Create the run (or attach to ``KEEL_RUN_ID``) and start the background thread."""
        i = self._init
        code = code_version() if i["code"] else None
        env = environment() if i["environment"] else None
        host = socket.gethostname()
        if self.attached:
            # PATCH alone (no GET first): a training key may write runs but not read them.
            # A finished run refuses with 409, "already finished; start a new run".
            body: dict[str, Any] = {"status": "running", "host": host, "tags": i["tags"]}
            if code is not None:
                body["code"] = code
            if env is not None:
                body["environment"] = env
            got = self.api.request("PATCH", self._path(), json=body)
            if i["params"]:
                self.log_params(i["params"])
        else:
            name = self.name or Path(sys.argv[0] or "run").stem or "run"
            got = self.api.request(
                "POST",
                "/api/runs",
                json={
                    "name": name,
                    "experiment": i["experiment"],
                    "pipeline_run_id": i["pipeline_run_id"],
                    "params": i["params"],
                    "tags": i["tags"],
                    "code": code,
                    "environment": env,
                    "host": host,
                    "started_at_ms": _now_ms(),
                },
            )
            self.id = got["id"]
        self.name = got["name"]
        self.status = "running"
        if self._system:
            try:
                self._sampler = SystemSampler()
            except Exception as e:  # psutil missing or refused: the run goes on without
                log.warning("keel run %s: no system metrics (%s)", self.id, e)
        self._thread = threading.Thread(
            target=self._loop, name=f"keel-run-{self.id[:8]}", daemon=True
        )
        self._thread.start()
        return self

    def end(self, status: str = "finished", error: str | None = None) -> None:
        """Flush what is buffered and record the final status (finished, failed, killed).

        Never raises: a run that cannot be closed is logged, the caller's outcome stands."""
        if self.status != "running":
            return
        self.status = status
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        try:
            self._sample_system()
            self.flush(final=True)
            body: dict[str, Any] = {"status": status, "ended_at_ms": _now_ms()}
            if error:
                body["error"] = error
            self.api.request("PATCH", self._path(), json=body)
        except Exception as e:
            log.error("keel run %s: could not record the end of the run (%s)", self.id, e)
        finally:
            self.api.close()

    def __enter__(self) -> Run:
        if self.status == "new":
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if exc is None:
            self.end("finished")
        elif isinstance(exc, KeyboardInterrupt):
            self.end("killed", "KeyboardInterrupt")
        else:
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            self.end(
                "failed", f"{exc_type.__name__ if exc_type else 'Error'}: {exc}\n\n{text[-8000:]}"
            )
        return False  # the exception, if any, propagates unchanged

    def _path(self, tail: str = "") -> str:
        return f"/api/runs/{quote(self.id, safe='')}{tail}"

    def _require_running(self) -> None:
        if self.status != "running":
            raise KeelError(f"run {self.id or '(not started)'} is {self.status}, not running")

    # -- logging -----------------------------------------------------------------

    def log_param(self, key: str, value: Any) -> None:
        """One parameter (a run's parameters do not change: a different value is 409)."""
        self.log_params({key: value})

    def log_params(self, params: dict[str, Any]) -> None:
        self.api.request("POST", self._path("/params"), json={"params": params})

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Merge tags into the run's (tags may change)."""
        self.api.request("PATCH", self._path(), json={"tags": tags})

    def set_tag(self, key: str, value: Any) -> None:
        self.set_tags({key: value})

    def log_metric(
        self, key: str, value: float, step: int | None = None, *, ts_ms: int | None = None
    ) -> None:
        """Buffer one point; ``step`` defaults to the key's previous step + 1 (first: 0)."""
        self._require_running()
        check_key(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            try:
                value = float(value)  # numpy and torch scalars
            except (TypeError, ValueError):
                raise KeelError(
                    f"metric '{key}': value must be a number, not {value!r}", status=400
                ) from None
        with self._lock:
            if len(self._buf) >= MAX_BUFFER:
                # Keel has been unreachable for long: newer points are dropped (counted),
                # so the batch being sent stays the front of the buffer.
                self._dropped += 1
                return
            if step is None:
                step = self._steps.get(key, -1) + 1
            self._steps[key] = max(step, self._steps.get(key, step))
            v = float(value)
            self._buf.append(
                {
                    "key": key,
                    "value": v if math.isfinite(v) else None,
                    "step": int(step),
                    "ts_ms": ts_ms or _now_ms(),
                }
            )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Several metrics at one step."""
        ts = _now_ms()
        for k, v in metrics.items():
            self.log_metric(k, v, step, ts_ms=ts)

    def flush(self, *, final: bool = False) -> None:
        """Send buffered points now (the background thread does it every few seconds)."""
        with self._flushing:
            self._flush(final)

    def _flush(self, final: bool) -> None:
        while True:
            with self._lock:
                batch = self._buf[:MAX_BATCH]
            if not batch:
                break
            try:
                self.api.request(
                    "POST",
                    self._path("/metrics"),
                    json={"metrics": batch},
                    retries=None if final else 0,
                )
            except InvalidRequest as e:  # would fail forever: drop it, say so
                log.error("keel run %s: %d metric points refused: %s", self.id, len(batch), e)
            with self._lock:
                del self._buf[: len(batch)]
        if self._dropped:
            log.error(
                "keel run %s: %d metric points dropped while Keel was unreachable",
                self.id,
                self._dropped,
            )
            self._dropped = 0

    def log_dataset(self, ref: str) -> dict[str, Any]:
        """Record the dataset version used (``name``, ``name@version``); returns
        ``{ref, name, id}`` as Keel resolved it (404 for an unknown dataset)."""
        got = self.api.request("POST", self._path("/inputs"), json={"datasets": [ref]})
        return got["resolved"]["datasets"][0]

    def log_prompt(self, ref: str) -> dict[str, Any]:
        """Record the prompt version used (``name``, ``name@label``, ``name@3``); returns
        ``{ref, name, version, id}``."""
        got = self.api.request("POST", self._path("/inputs"), json={"prompts": [ref]})
        return got["resolved"]["prompts"][0]

    def log_artifact(self, path: str | os.PathLike[str], name: str | None = None) -> list[dict]:
        """Upload a file, or every file of a directory, to ``<name or basename>/…``.

        Returns the stored rows (path, size, sha256, uri)."""
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"no such file or directory: {p}")
        base = (name or p.name).strip("/")
        if p.is_file():
            files = [(p, base)]
        else:
            files = [
                (f, f"{base}/{f.relative_to(p).as_posix()}")
                for f in sorted(p.rglob("*"))
                if f.is_file()
            ]
        out = []
        for f, dest in files:
            out.append(
                self.api.request(
                    "POST",
                    self._path("/artifacts"),
                    params={"path": dest},
                    content=lambda f=f: open(f, "rb"),
                )
            )
        return out

    # -- background ----------------------------------------------------------------

    def _sample_system(self) -> None:
        if self._sampler is None:
            return
        try:
            values = self._sampler.sample()
        except Exception as e:
            log.warning("keel run %s: system metrics stopped (%s)", self.id, e)
            self._sampler = None
            return
        ts = _now_ms()
        with self._lock:
            step = self._system_step
            self._system_step += 1
            self._buf += [
                {"key": k, "value": v, "step": step, "ts_ms": ts} for k, v in values.items()
            ]

    def _loop(self) -> None:
        next_sample = time.monotonic() + self._system_interval
        next_flush = time.monotonic() + self._flush_interval
        failing = False
        while not self._stop.wait(max(0.01, min(next_sample, next_flush) - time.monotonic())):
            now = time.monotonic()
            if now >= next_sample:
                self._sample_system()
                next_sample = now + self._system_interval
            if now >= next_flush:
                next_flush = now + self._flush_interval
                try:
                    self.flush()
                    failing = False
                except Exception as e:  # kept in the buffer, sent on the next try
                    if not failing:
                        log.warning("keel run %s: metrics not sent yet (%s)", self.id, e)
                    failing = True


def run(name: str | None = None, **kwargs: Any) -> Run:
    """Start a tracked run; see :class:`Run` for the options.

    ``with keel.run("train", params={...}) as run:`` ends it as ``finished``, or
    ``failed`` with the error when the block raises (the exception propagates).
    With ``KEEL_RUN_ID`` set (by a pipeline step) it attaches to that run."""
    return Run(name, **kwargs).start()
