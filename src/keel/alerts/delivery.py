"""Delivery of notification groups: retries, timeouts, isolation, and a record of each.

The alert engine calls :meth:`Dispatcher.dispatch` with what one tick has for
each channel and moves on: every channel is delivered by its own task, so a
slow or failing channel never blocks another, nor the evaluator. Each delivery
ends in one row of ``alert_deliveries`` (sent or failed, attempts, error), and
nothing a notifier does — even a bug — escapes :meth:`Dispatcher.deliver`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from keel._ids import new_id
from keel.alerts import messages
from keel.alerts.model import DeliveryError, Notification
from keel.alerts.notifiers import Notifier, SharedSession, build_notifiers
from keel.config import AlertsSettings
from keel.store.tables import alert_deliveries

log = logging.getLogger("keel.alerts.delivery")

#: No single wait between attempts is longer than this, whatever the backoff says.
MAX_BACKOFF_S = 300.0


@dataclass
class DeliveryRecord:
    """The outcome of delivering one group to one channel (one ``alert_deliveries`` row)."""

    id: str
    ts_ms: int
    channel: str
    kind: str  # the channel's kind (slack, webhook, …), "unknown" for an unknown channel
    status: str  # sent | failed
    attempts: int
    error: str | None
    alerts: list[dict[str, Any]] = field(default_factory=list)  # {rule, labels, kind}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_test_notification(
    channel: str, now_ms: int | None = None, dashboard_url: str | None = None
) -> Notification:
    """A clearly labelled sample alert for ``keel alerts test CHANNEL``."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    links = {"dashboard": dashboard_url.rstrip("/") + "/"} if dashboard_url else {}
    return Notification(
        rule=messages.TEST_RULE,
        kind="test",
        severity="info",
        signal="error_rate",
        labels={"channel": channel},
        value=0.123,
        threshold=0.05,
        op="above",
        mode="value",
        window_s=300.0,
        since_ms=now - 7 * 60_000,
        ts_ms=now,
        unit="ratio",
        description=(
            f"This is a test of the alert channel '{channel}', sent by `keel alerts test`. "
            "Nothing is wrong; if you can read this, the channel works."
        ),
        links=links,
    )


class Dispatcher:
    """Delivers groups of notifications to named channels, with retries, and records each."""

    def __init__(
        self,
        engine: Engine | None,
        notifiers: Mapping[str, Notifier],
        *,
        attempts: int,
        backoff_s: float,
        session: SharedSession | None = None,
        dashboard_url: str | None = None,
    ) -> None:
        self.engine = engine
        self.notifiers = dict(notifiers)
        self.attempts = max(1, attempts)
        self.backoff_s = max(0.0, backoff_s)
        self.dashboard_url = dashboard_url
        self._session = session
        self._tasks: set[asyncio.Task[DeliveryRecord]] = set()
        #: Called with every finished delivery (sent or failed), e.g. to count it.
        self.on_record: Callable[[DeliveryRecord], None] | None = None
        # One delivery at a time per channel, so "resolved" never overtakes "firing".
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def from_settings(
        cls,
        engine: Engine | None,
        alerts: AlertsSettings,
        environ: Mapping[str, str],
        *,
        dashboard_url: str | None = None,
    ) -> Dispatcher:
        """Notifiers for every configured channel, sharing one lazily created HTTP session."""
        session = SharedSession()
        return cls(
            engine,
            build_notifiers(alerts.channels, environ, session),
            attempts=alerts.delivery_attempts,
            backoff_s=alerts.delivery_backoff_s,
            session=session,
            dashboard_url=dashboard_url or alerts.dashboard_url,
        )

    # --- delivering ---------------------------------------------------------------

    def dispatch(self, by_channel: Mapping[str, list[Notification]]) -> list[asyncio.Task]:
        """Start one delivery task per channel and return at once (call inside the loop)."""
        started = []
        for channel, notifications in by_channel.items():
            if not notifications:
                continue
            task = asyncio.create_task(
                self.deliver(channel, list(notifications)), name=f"keel-alert-delivery:{channel}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started.append(task)
        return started

    @property
    def pending(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait for running deliveries; those still running after ``timeout`` are cancelled
        (and recorded as failed)."""
        tasks = list(self._tasks)
        if not tasks:
            return
        _done, still = await asyncio.wait(tasks, timeout=timeout)
        for t in still:
            t.cancel()
        if still:
            await asyncio.gather(*still, return_exceptions=True)

    async def aclose(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Drain running deliveries (up to ``timeout``), then close the HTTP session."""
        await self.drain(timeout)
        if self._session is not None:
            await self._session.aclose()

    async def send_test(self, channel: str) -> DeliveryRecord:
        """Deliver a test notification to ``channel`` now (with retries) and record it."""
        return await self.deliver(
            channel, [make_test_notification(channel, dashboard_url=self.dashboard_url)]
        )

    async def deliver(self, channel: str, notifications: list[Notification]) -> DeliveryRecord:
        """Send one group to one channel with retries; never raises (but honours cancel)."""
        notifier = self.notifiers.get(channel)
        if notifier is None:
            known = ", ".join(sorted(self.notifiers)) or "none configured"
            record = self._record(
                channel,
                "unknown",
                "failed",
                0,
                f"unknown channel '{channel}' (known: {known})",
                notifications,
            )
            log.warning("alert delivery: %s", record.error)
            return await self._save(record)
        lock = self._locks.setdefault(channel, asyncio.Lock())
        tried = [0]  # attempts made so far, readable when cancelled mid-way
        try:
            async with lock:
                attempts, status, error = await self._attempt(notifier, notifications, tried)
        except asyncio.CancelledError:
            record = self._record(
                channel,
                notifier.kind,
                "failed",
                tried[0],
                "cancelled before delivery finished (Keel was shutting down)",
                notifications,
            )
            self._write_logged(record)
            raise
        except Exception as e:  # a bug in the retry loop itself: still never escapes
            log.exception("alert delivery to %s failed unexpectedly", channel)
            attempts, status = tried[0], "failed"
            error = notifier.scrub(f"internal error: {type(e).__name__}: {e}")
        record = self._record(channel, notifier.kind, status, attempts, error, notifications)
        if status == "failed":
            log.warning(
                "alert delivery to channel %s (%s) failed after %d attempt(s): %s",
                channel,
                notifier.kind,
                attempts,
                error,
            )
        return await self._save(record)

    async def _attempt(
        self, notifier: Notifier, notifications: list[Notification], tried: list[int]
    ) -> tuple[int, str, str | None]:
        """(attempts, status, last error) after retrying retryable failures."""
        timeout = notifier.settings.timeout_s
        error: str | None = None
        for attempt in range(1, self.attempts + 1):
            retry_after: float | None = None
            tried[0] = attempt
            try:
                # The notifier also bounds its own I/O; this bounds everything else.
                async with asyncio.timeout(timeout):
                    await notifier.send(notifications)
                return attempt, "sent", None
            except DeliveryError as e:
                error, retryable = str(e), e.retryable
                retry_after = getattr(e, "retry_after_s", None)
            except TimeoutError:
                error, retryable = f"no answer within {timeout:g} s (timeout_s)", True
            except Exception as e:
                log.exception("the %s notifier of channel %s raised", notifier.kind, notifier.name)
                error = f"internal error in the {notifier.kind} notifier: {type(e).__name__}: {e}"
                retryable = False
            error = notifier.scrub(error)
            if not retryable or attempt == self.attempts:
                return attempt, "failed", error
            delay = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            if retry_after:
                delay = max(delay, retry_after)
            log.info(
                "alert delivery to %s failed (attempt %d of %d), retrying in %.2g s: %s",
                notifier.name,
                attempt,
                self.attempts,
                delay,
                error,
            )
            await asyncio.sleep(delay)
        return self.attempts, "failed", error  # pragma: no cover (attempts >= 1)

    # --- recording ---------------------------------------------------------------

    @staticmethod
    def _record(
        channel: str,
        kind: str,
        status: str,
        attempts: int,
        error: str | None,
        notifications: list[Notification],
    ) -> DeliveryRecord:
        return DeliveryRecord(
            id=new_id(),
            ts_ms=int(time.time() * 1000),
            channel=channel,
            kind=kind,
            status=status,
            attempts=attempts,
            error=error,
            alerts=[
                {"rule": n.rule, "labels": dict(sorted(n.labels.items())), "kind": n.kind}
                for n in notifications
            ],
        )

    async def _save(self, record: DeliveryRecord) -> DeliveryRecord:
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:
                log.exception("delivery observer failed")
        if self.engine is not None:
            try:
                await asyncio.to_thread(self._write_logged, record)
            except Exception:  # pragma: no cover (_write_logged logs and swallows)
                pass
        return record

    def _write_logged(self, record: DeliveryRecord) -> None:
        if self.engine is None:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    alert_deliveries.insert().values(
                        id=record.id,
                        ts_ms=record.ts_ms,
                        channel=record.channel,
                        kind=record.kind,
                        status=record.status,
                        attempts=record.attempts,
                        error=record.error,
                        alerts=orjson.dumps(record.alerts).decode(),
                    )
                )
        except Exception:
            # The store being down must not turn a delivery into a crash; the log keeps it.
            log.exception(
                "could not record alert delivery to %s (%s, %d attempts, error: %s)",
                record.channel,
                record.status,
                record.attempts,
                record.error,
            )


def recent(engine: Engine, limit: int = 50, channel: str | None = None) -> list[dict[str, Any]]:
    """The newest deliveries first, ``alerts`` parsed back into a list."""
    q = sa.select(alert_deliveries).order_by(
        alert_deliveries.c.ts_ms.desc(), alert_deliveries.c.id.desc()
    )
    if channel is not None:
        q = q.where(alert_deliveries.c.channel == channel)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(q.limit(max(1, limit)))]
    for row in rows:
        try:
            row["alerts"] = orjson.loads(row["alerts"])
        except (orjson.JSONDecodeError, TypeError):
            row["alerts"] = []
    return rows
