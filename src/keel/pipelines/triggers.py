"""The trigger daemon: starts pipelines on a cron schedule or when alert rules fire.

It never runs a pipeline in the server: it records a ``queued`` pipeline run
with the trigger (kind and reason), then starts ``keel pipeline run FILE
--run-id ID`` as a subprocess that adopts that row. An alert-triggered start
is followed by a cool-down (per pipeline, read from the store so it holds
across restarts and replicas); a pipeline whose previous triggered run is
still going is not started again. One replica runs it (a singleton daemon).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from croniter import croniter
from sqlalchemy.engine import Engine

from keel.config.pipelines import PipelinesSettings, PipelineTriggerSettings
from keel.daemon import Daemon, now_ms
from keel.pipelines import record
from keel.store.tables import alert_states

log = logging.getLogger("keel.pipelines")

KEEL_CLI = [sys.executable, "-c", "from keel.cli import main; main()"]


def next_fire_ms(expr: str, after_ms: int) -> int:
    """The first time (UTC, ms) strictly after ``after_ms`` that the cron expression names."""
    start = datetime.fromtimestamp(after_ms / 1000, UTC)
    return int(croniter(expr, start).get_next(float) * 1000)


def _iso(ms: int | None) -> str:
    if not ms:
        return "?"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PipelineTrigger(Daemon):
    """Starts the configured pipelines; ``started`` lists ``(pipeline, run id, kind)``."""

    name = "pipeline-triggers"
    singleton = True

    def __init__(
        self,
        engine: Engine,
        settings: PipelinesSettings,
        *,
        url: str,
        api_key: str | None = None,
        store_env: dict[str, str] | None = None,
        data_dir: str = ".keel",
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.interval_s = settings.interval_s
        super().__init__(engine)
        self.engine: Engine = engine
        self.pipelines = settings.pipelines
        self.url = url
        self.api_key = api_key
        self.store_env = store_env or {}
        self.data_dir = data_dir
        self.clock = clock
        t = clock()
        self.next_ms: dict[str, int] = {
            p.name: next_fire_ms(p.schedule, t) for p in self.pipelines if p.schedule
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started: list[tuple[str, str, str]] = []

    async def tick(self) -> None:
        await asyncio.to_thread(self.check)

    def check(self) -> list[str]:
        """One pass over schedules and alerts; the pipeline run ids it started."""
        t = self.clock()
        out = []
        for p in self.pipelines:
            proc = self.procs.get(p.name)
            if proc is not None and proc.poll() is None:
                continue  # its previous triggered run is still going
            why = self.due(p, t)
            if why is not None:
                kind, reason = why
                out.append(self.launch(p, kind, reason))
        return out

    def due(self, p: PipelineTriggerSettings, t: int) -> tuple[str, str] | None:
        """``(kind, reason)`` when ``p`` should start at ``t`` (advances its schedule)."""
        if p.on_alerts:
            firing = self._firing(p.on_alerts)
            if firing:
                last = record.last_triggered(self.engine, p.name, ("alert",))
                if last is None or t - last >= p.cooldown * 1000:
                    r = firing[0]
                    return "alert", (
                        f"alert {r.rule} firing since {_iso(r.firing_since_ms)} "
                        f"(value {r.value}, threshold {r.threshold}, labels {r.labels})"
                    )
        if p.schedule and t >= self.next_ms[p.name]:
            due = self.next_ms[p.name]
            self.next_ms[p.name] = next_fire_ms(p.schedule, t)
            return "schedule", f"cron '{p.schedule}' due at {_iso(due)}"
        return None

    def _firing(self, rules: list[str]) -> list[Any]:
        q = (
            sa.select(alert_states)
            .where(alert_states.c.rule.in_(rules), alert_states.c.state == "firing")
            .order_by(alert_states.c.firing_since_ms)
        )
        with self.engine.connect() as c:
            return list(c.execute(q))

    def launch(self, p: PipelineTriggerSettings, kind: str, reason: str) -> str:
        """Record a queued run with its trigger and start the subprocess that runs it."""
        rid = record.create_run(
            self.engine, p.name, file=str(Path(p.file).resolve()), trigger_kind=kind,
            trigger_reason=reason, status="queued", created_by=f"trigger:{kind}",
        )  # fmt: skip
        env = {**os.environ, **self.store_env, "KEEL_URL": self.url}
        if self.api_key:
            env["KEEL_API_KEY"] = self.api_key
        logs = Path(self.data_dir) / "pipelines"
        logs.mkdir(parents=True, exist_ok=True)
        argv = [*KEEL_CLI, "pipeline", "run", p.file, "--run-id", rid, "--trigger", kind]
        try:
            with (logs / f"{rid}.trigger.log").open("ab") as out:
                self.procs[p.name] = subprocess.Popen(
                    argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
        except OSError as e:
            record.update_run(self.engine, rid, status="failed", error=f"cannot start: {e}")
            raise
        log.info("pipeline %s started (run %s): %s", p.name, rid, reason)
        self.started.append((p.name, rid, kind))
        return rid
