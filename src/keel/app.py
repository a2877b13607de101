"""``create_app(settings)``: the whole Keel ASGI app, built from explicit parts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from keel._version import __version__
from keel.alerts import api as alerts_api
from keel.alerts.delivery import Dispatcher
from keel.alerts.engine import AlertEngine
from keel.auth import AuthMiddleware, KeyStore, auth_enabled
from keel.auth import api as auth_api
from keel.config import Settings
from keel.costs import PriceCatalog, Pricer
from keel.costs import api as costs_api
from keel.data import api as data_api
from keel.data.versions import DatasetStore
from keel.deploy.wiring import build_deploy
from keel.drift import api as drift_api
from keel.drift.monitor import build_drift
from keel.errors import ConfigError, InvalidRequest, KeelError, NotFound
from keel.evals import api as evals_api
from keel.evals import feedback_api
from keel.evals.client import model_client_for
from keel.evals.online import build_online, validate_online
from keel.gateway import limits as limits_mod
from keel.gateway.limits import Limits
from keel.gateway.providers.base import PROVIDER_KINDS, Provider
from keel.gateway.redact import CaptureEnricher
from keel.gateway.router import Router
from keel.gateway.routes import Gateway, error_response
from keel.monitoring import api as metrics_api
from keel.monitoring import components_api
from keel.monitoring.metrics import (
    CallbackCollector,
    GatewayMetrics,
    daemon_families,
    recorder_families,
)
from keel.monitoring.probes import ProbeDaemon
from keel.monitoring.sampler import ResourceSampler
from keel.prompts import api as prompts_api
from keel.prompts.store import PromptStore
from keel.registry import api as registry_api
from keel.registry.service import RegistryService
from keel.runs import api as runs_api
from keel.runs.artifacts import ArtifactStore
from keel.runs.store import RunStore
from keel.store.engine import make_engine, migrate
from keel.store.recorder import Recorder
from keel.store.retention import RetentionDaemon
from keel.tracing import api as traces_api
from keel.tracing import otlp

log = logging.getLogger("keel")

ROLES = ("gateway", "daemons")


@dataclass
class KeelState:
    settings: Settings
    engine: Engine
    recorder: Recorder
    providers: dict[str, Provider]
    router: Router
    registry: CollectorRegistry
    metrics: GatewayMetrics
    daemons: list[Any]
    keystore: Any = None


def _load_provider_kinds() -> None:
    # Importing a module registers its kind.
    import keel.gateway.providers.openai

    with contextlib.suppress(ImportError):
        import keel.gateway.providers.anthropic  # noqa: F401


def build_providers(settings: Settings, environ: Mapping[str, str]) -> dict[str, Provider]:
    _load_provider_kinds()
    from keel.gateway.providers._http import make_session

    providers: dict[str, Provider] = {}
    g = settings.gateway
    for name, ps in settings.providers.items():
        cls = PROVIDER_KINDS[ps.kind]
        factory = functools.partial(
            make_session,
            read_timeout_s=ps.timeout_s or g.default_timeout_s,
            connect_timeout_s=ps.connect_timeout_s or g.connect_timeout_s,
            max_connections=g.max_connections,
        )
        key = environ.get(ps.api_key_env) if ps.api_key_env else None
        if ps.api_key_env and not key:
            log.warning(
                "provider %s: environment variable %s is not set; calls will be sent without a key",
                name,
                ps.api_key_env,
            )
        providers[name] = cls(name, ps, session_factory=factory, api_key=key)
    if settings.local.enabled:
        try:
            from keel.gateway.providers.local import LocalProvider
        except ImportError as e:  # pragma: no cover - the module ships with Keel
            log.warning("local provider unavailable: %s", e)
        else:
            from keel.config import ProviderSettings

            providers["local"] = LocalProvider(
                "local", ProviderSettings(kind="local"), local=settings.local
            )
    return providers


def create_app(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    engine: Engine | None = None,
    roles: Collection[str] = ROLES,
) -> FastAPI:
    """Build the ASGI app. Reads nothing from the environment unless ``environ`` is given
    (``cli.py`` passes ``os.environ`` so provider keys can be resolved).

    ``roles``: ``gateway`` serves the OpenAI-compatible routes and OTLP ingest;
    ``daemons`` runs the once-per-deployment loops (alerts, probes, retention).
    ``keel up`` runs both; ``keel up --role gateway`` and ``keel worker`` split them.
    The REST API, /metrics and the resource sampler are in every process."""
    unknown = set(roles) - set(ROLES)
    if unknown or not roles:
        raise ConfigError(f"roles must be among {', '.join(ROLES)}; got {sorted(roles)}")
    env = dict(environ or {})
    data_dir = Path(settings.data_dir)
    engine = engine or make_engine(settings.effective_database_url)
    rs = settings.recorder
    recorder = Recorder(
        engine,
        data_dir / "spill",
        queue_size=rs.queue_size,
        batch_size=rs.batch_size,
        flush_interval_s=rs.flush_interval_s,
        replay_interval_s=rs.replay_interval_s,
    )
    providers = build_providers(settings, env)
    router = Router.from_settings(settings, providers)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    recorder.observers.append(metrics.observe)
    capture = CaptureEnricher.from_settings(settings)
    if capture.active:  # redaction and capture modes, in the writer thread
        recorder.enrichers.append(capture)
    daemons: list[Any] = [
        ResourceSampler(
            engine, registry, interval_s=settings.monitoring.sample_interval_s, recorder=recorder
        ),
    ]
    if "daemons" in roles:
        daemons.append(RetentionDaemon(engine, settings.retention))
    # The embedded model lives in each gateway process: a worker neither loads it
    # nor probes it (its health is that of the gateways, probed where they run).
    serving = "gateway" in roles
    probed = providers if serving else {n: p for n, p in providers.items() if p.kind != "local"}
    probe_daemon = ProbeDaemon(
        engine, settings.components, probed, settings.monitoring, env, registry
    )
    if "daemons" in roles:
        daemons.append(probe_daemon)
    import keel.alerts.sources  # noqa: F401  (registers the signals)
    from keel.alerts import budget_signal
    from keel.drift import signals as _drift_signals  # noqa: F401  (registers drift_*)
    from keel.evals import signals as _eval_signals  # noqa: F401  (registers eval_*)

    budget_signal.configure(settings.budgets)

    alerts_api.validate_alert_config(settings.alerts)
    validate_online(settings.evals)
    base_url = settings.alerts.dashboard_url or f"http://{settings.host}:{settings.port}"
    dispatcher = Dispatcher.from_settings(engine, settings.alerts, env, dashboard_url=base_url)
    deliveries = Counter(
        "keel_alert_deliveries",
        "Alert notifications delivered, by channel and outcome.",
        ["channel", "kind", "status"],
        registry=registry,
    )
    dispatcher.on_record = lambda r: deliveries.labels(r.channel, r.kind, r.status).inc()
    alert_engine = AlertEngine(engine, settings.alerts, dispatcher, base_url)
    if "daemons" in roles:
        daemons.append(alert_engine)
    drift = build_drift(
        engine,
        settings.drift,
        registry,
        datasets=DatasetStore(engine, settings.artifact_root),
        embed_model_dir=settings.local.embed_model_dir,
        local_enabled=settings.local.enabled,
        run_daemons="daemons" in roles,
    )
    daemons += drift.daemons
    registry.register(CallbackCollector(recorder_families(recorder)))
    registry.register(CallbackCollector(daemon_families(lambda: daemons)))
    pricer = Pricer(PriceCatalog.for_settings(settings), registry)
    limits = Limits(settings, engine)
    prompt_store = PromptStore(engine)
    if "daemons" in roles:
        # Judges call models through this app's own gateway (built lazily: `app` comes later).
        daemons += build_online(
            engine,
            settings.evals,
            registry,
            client_factory=lambda: model_client_for(app, settings.evals, env),
            prompt_store=prompt_store,
            late_window_s=_slowest_call_s(settings) + 60,
        )
    gateway = Gateway(
        router,
        recorder,
        settings.gateway,
        settings.recorder,
        metrics,
        pricer,
        limits,
        prompt_store,
    )
    keystore = KeyStore(engine, redis_url=settings.redis_url, cache_s=settings.auth.key_cache_s)
    admin_secret = env.get(settings.auth.admin_key_env) if settings.auth.admin_key_env else None
    state = KeelState(settings, engine, recorder, providers, router, registry, metrics, daemons)
    state.keystore = keystore

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(migrate, engine)
        await keystore.start()
        await limits.start()
        recorder.start()
        for p in providers.values() if serving else ():
            try:
                await p.start()
            except Exception:
                log.exception("provider %s failed to start", p.name)
        for d in daemons:
            d.start()
        try:
            yield
        finally:
            for d in daemons:
                with contextlib.suppress(Exception):
                    await d.stop()
            for p in providers.values():
                with contextlib.suppress(Exception):
                    await p.aclose()
                with contextlib.suppress(Exception):
                    await p.close_session()
            with contextlib.suppress(Exception):
                await limits.aclose()
            await asyncio.to_thread(recorder.stop)
            with contextlib.suppress(Exception):
                await keystore.aclose()

    app = FastAPI(
        title="Keel",
        version=__version__,
        description="Self-hosted LLMOps: an OpenAI-compatible gateway that records every call.",
        lifespan=lifespan,
    )
    app.state.keel = state

    @app.exception_handler(KeelError)
    async def _keel_error(request: Request, exc: KeelError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return error_response(InvalidRequest(f"{loc}: {first.get('msg', 'invalid')}", param=loc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            return error_response(NotFound(f"no route {request.method} {request.url.path}"))
        err = KeelError(str(exc.detail), status=exc.status_code)
        err.type = "http_error"
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(KeelError("internal error; the details are in Keel's log"))

    if "gateway" in roles:
        app.include_router(gateway.api_router())
    app.include_router(traces_api.make_router(engine))
    if "gateway" in roles:
        app.include_router(otlp.make_router(engine, registry, settings.gateway.max_body_bytes))
    app.include_router(metrics_api.make_router(engine))
    app.include_router(components_api.make_router(engine, probe_daemon))
    app.include_router(alerts_api.make_router(engine, settings.alerts, dispatcher))
    app.include_router(auth_api.make_router(keystore, engine))
    app.include_router(costs_api.make_router(engine))
    app.include_router(limits_mod.make_router(limits))
    app.include_router(prompts_api.make_router(prompt_store))
    app.include_router(data_api.make_router(DatasetStore(engine, settings.artifact_root)))
    app.include_router(drift_api.make_router(drift.runner, drift.errors))
    run_store, artifacts = RunStore(engine), ArtifactStore(engine, settings.artifact_root)
    app.include_router(
        runs_api.make_router(
            run_store,
            artifacts,
            DatasetStore(engine, settings.artifact_root),
            prompt_store,
            max_artifact_bytes=settings.registry.max_artifact_mb * 1024 * 1024,
        )
    )
    # The deploy step reaches the registry (and its on_approved hooks) through app.state.
    app.state.registry = RegistryService(
        engine,
        run_store,
        artifacts,
        prompt_store,
        providers=[*settings.providers, *(["local"] if settings.local.enabled else [])],
        max_card_bytes=settings.registry.max_card_kb * 1024,
    )
    app.include_router(registry_api.make_router(app.state.registry))
    # Gated deployment: route sync in every gateway process, the monitor under "daemons";
    # approvals in the registry start deployments.
    deploy = build_deploy(
        engine,
        settings,
        env,
        roles=roles,
        router=router,
        providers=providers,
        registry=app.state.registry,
        dispatcher=dispatcher,
        client_factory=lambda: model_client_for(app, settings.evals, env),
        dashboard_url=base_url,
    )
    daemons += deploy.daemons
    app.state.deploy = deploy
    app.include_router(deploy.router)
    app.include_router(evals_api.make_router(engine))
    app.include_router(feedback_api.make_router(engine, settings.evals, recorder))
    # Pipelines: runs are read everywhere; the trigger daemon (cron schedules, firing
    # alert rules) starts `keel pipeline run` subprocesses, once per deployment.
    from keel.pipelines import api as pipelines_api
    from keel.pipelines.triggers import PipelineTrigger

    app.include_router(pipelines_api.make_router(engine))
    if "daemons" in roles and settings.pipelines.enabled and settings.pipelines.pipelines:
        app.state.pipeline_trigger = PipelineTrigger(
            engine,
            settings.pipelines,
            url=f"http://{settings.host}:{settings.port}",
            api_key=admin_secret,
            store_env={
                "KEEL_DATABASE_URL": settings.effective_database_url,
                "KEEL_DATA_DIR": settings.data_dir,
            },
            data_dir=settings.data_dir,
        )
        daemons.append(app.state.pipeline_trigger)
    # Outermost: nothing runs for a request that has no valid key.
    app.add_middleware(
        AuthMiddleware,
        keystore=keystore,
        enabled=auth_enabled(settings),
        admin_secret=admin_secret,
        engine=engine,
    )

    @app.get("/healthz", tags=["ops"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Readiness: store reachable, a provider available")
    async def readyz() -> Response:
        store_ok, store_err = True, None
        try:
            await asyncio.wait_for(asyncio.to_thread(_ping, engine), timeout=3)
        except Exception as e:
            store_ok, store_err = False, f"{type(e).__name__}: {e}"[:300]
        avail = {n: p.available for n, p in providers.items()}
        ok = store_ok and any(avail.values()) and limits.ready
        body = {
            "status": "ready" if ok else "not ready",
            "store": {"ok": store_ok, "error": store_err},
            "providers": avail,
            "recorder": {"queue_depth": recorder.queue_depth, **asdict(recorder.stats)},
            "limits": limits.status(),
        }
        return Response(
            orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json"
        )

    if settings.monitoring.metrics_enabled:

        @app.get(
            "/metrics",
            tags=["ops"],
            summary="Prometheus metrics of this process",
            response_class=Response,
        )
        def prometheus_metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/recorder", tags=["ops"], summary="Recorder counters")
    async def recorder_stats() -> dict[str, Any]:
        return {
            "queue_depth": recorder.queue_depth,
            "spill_files": len(recorder.spill_files()),
            **asdict(recorder.stats),
        }

    return app


def _slowest_call_s(settings: Settings) -> float:
    """The longest a gateway call can take (its read timeout), for late-trace catch-up."""
    timeouts = [p.timeout_s for p in settings.providers.values() if p.timeout_s]
    return max([settings.gateway.default_timeout_s, *timeouts])


def _ping(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def environ_for_app() -> dict[str, str]:
    """What ``cli.py`` hands to :func:`create_app`."""
    return dict(os.environ)
