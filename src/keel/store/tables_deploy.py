"""Gated deployment: routes every gateway replica follows, deployments and their history.

Migration 0008 creates these (and adds ``traces.route_version``). JSON is
stored as text, as everywhere else in the schema.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, String, Table, Text

from keel.store.tables import metadata

# One row per gateway alias that the deployment machinery routes. It overrides
# (or adds) the alias of the same name in keel.yaml, which stays the fallback
# while no row exists. ``revision`` grows by one with every change of the row:
# each gateway process polls (alias, revision) pairs and reloads what changed.
deploy_routes = Table(
    "deploy_routes",
    metadata,
    Column("alias", String(200), primary_key=True),
    Column("model", String(200), nullable=False),  # the registry model
    # JSON target {ref, version, provider, model, params, prompt, base_url, artifact, served_by};
    # null: the keel.yaml alias of the same name serves as the stable side.
    Column("stable", Text),
    Column("canary", Text),  # JSON target, or null when all traffic goes to stable
    Column("canary_share", Float, nullable=False, default=0.0),
    Column("deployment_id", String(32)),  # the deployment that wrote the route last
    Column("revision", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
    Column("updated_by", String(200)),
)

# One row per approved version that entered the deployment state machine.
deployments = Table(
    "deployments",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("alias", String(200), nullable=False),
    Column("baseline_version", Integer),  # null: the keel.yaml alias (or nothing) was serving
    # pending_validation | validating | canary | promoted | rolled_back |
    # validation_failed | cancelled
    Column("state", String(32), nullable=False),
    # The model's name while the deployment is active, null once it is final: the
    # unique constraint makes "one active deployment per model" a property of the
    # store, not of a check that two replicas could both pass.
    Column("active_key", String(200), unique=True),
    Column("seq", Integer, nullable=False),  # seq of the last event
    Column("canary_share", Float, nullable=False),
    Column("target", Text),  # JSON: what the version serves from (see deploy_routes.stable)
    Column("worker", String(200)),  # the process running its validation
    Column("reason", Text),  # why it is in its state (numbers included)
    Column("validation", Text),  # JSON: suite, run id, gates, passed, error
    Column("comparison", Text),  # JSON: canary vs baseline, the latest computed
    Column("notified_state", String(32)),  # the last state the channels were told about
    Column("created_by", String(200)),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
    Column("state_since_ms", BigInteger, nullable=False),  # when the current state began
    Index("ix_deployments_model_created", "model", "created_at_ms"),
    Index("ix_deployments_state", "state"),
)

# Append-only: every transition, numbered per deployment without gaps.
deployment_events = Table(
    "deployment_events",
    metadata,
    Column("deployment_id", String(32), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("from_state", String(32)),
    Column("to_state", String(32), nullable=False),
    Column("actor", String(200), nullable=False),  # "deploy-monitor", a key's principal, …
    Column("reason", Text),
    Column("details", Text),  # JSON
    Column("ts_ms", BigInteger, nullable=False),
)
