"""Tracked runs and the model registry (migration 0007).

Runs: one row per training/evaluation run, its parameters, metric points
(training curves) and artifact files. Registry: models, their numbered versions
(an artifact or a deployment config), aliases/stages and approval decisions.
Every registry change is also appended to ``audit_log`` (tables.py).
JSON is stored as text, as everywhere else in the schema.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, String, Table, Text

from keel.store.tables import metadata

runs = Table(
    "runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("experiment", String(200)),
    Column("pipeline_run_id", String(64)),  # set by a pipeline step that created the run
    Column("status", String(16), nullable=False),  # pending | running | finished | failed | killed
    Column("error", Text),
    Column("tags", Text),  # JSON object
    Column("inputs", Text),  # JSON: {"datasets": [...], "prompts": [...]}
    Column("code", Text),  # JSON: {"commit", "dirty", "branch"} or null without git
    Column("environment", Text),  # JSON: {"python", "platform", "packages": ["name==ver"]}
    Column("metrics", Text),  # JSON: latest point per key {key: {value, step, ts_ms}}
    Column("host", String(200)),
    Column("created_by", String(200)),
    Column("started_at_ms", BigInteger, nullable=False),
    Column("ended_at_ms", BigInteger),
    Index("ix_runs_started", "started_at_ms"),
    Index("ix_runs_name_started", "name", "started_at_ms"),
    Index("ix_runs_experiment_started", "experiment", "started_at_ms"),
    Index("ix_runs_pipeline", "pipeline_run_id"),
)

run_params = Table(
    "run_params",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("key", String(250), primary_key=True),
    Column("value", Text),  # JSON of the value as logged
)

# One row per point; several values at one step are kept (nothing is overwritten).
run_metrics = Table(
    "run_metrics",
    metadata,
    Column("run_id", String(32), nullable=False),
    Column("key", String(250), nullable=False),
    Column("step", BigInteger, nullable=False),
    Column("value", Float),  # NULL for NaN/inf (JSON cannot carry them)
    Column("ts_ms", BigInteger, nullable=False),
    # Covering: a curve is read from the index alone, in step order.
    Index("ix_run_metrics_curve", "run_id", "key", "step", "ts_ms", "value"),
)

run_artifacts = Table(
    "run_artifacts",
    metadata,
    Column("run_id", String(32), primary_key=True),
    Column("path", String(500), primary_key=True),  # relative, '/'-separated
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("uri", String(1000), nullable=False),  # <artifact_root>/runs/<run_id>/<path>
    Column("created_at_ms", BigInteger, nullable=False),
)

registered_models = Table(
    "registered_models",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("description", Text),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("created_by", String(200)),
    # Touched by every change: the first write of a registry transaction, so
    # version numbers and alias moves of one model are serialised (row lock).
    Column("updated_at_ms", BigInteger, nullable=False),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("model", String(200), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),  # artifact | deployment
    Column("status", String(16), nullable=False),  # candidate | approved | rejected
    Column("source_run_id", String(32)),
    Column("artifact_uri", String(1000)),
    Column("deployment", Text),  # JSON: {provider, model, prompt, params}
    Column("metrics", Text),  # JSON object
    Column("lineage", Text),  # JSON: {run_id, datasets, prompts}
    Column("card", Text),  # model card, Markdown
    Column("description", Text),
    Column("created_by", String(200)),
    Column("created_at_ms", BigInteger, nullable=False),
    Index("ix_model_versions_run", "source_run_id"),
)

model_aliases = Table(
    "model_aliases",
    metadata,
    Column("model", String(200), primary_key=True),
    Column("alias", String(100), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("updated_by", String(200)),
    Column("updated_at_ms", BigInteger, nullable=False),
)

approvals = Table(
    "approvals",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    Column("decision", String(16), nullable=False),  # approve | reject
    Column("principal", String(200), nullable=False),
    Column("note", Text),
    Column("ts_ms", BigInteger, nullable=False),
    Index("ix_approvals_model_version", "model", "version"),
)
