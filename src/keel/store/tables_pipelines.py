"""Pipeline runs and their steps (migration 0009).

A pipeline run links what it produced: tracked runs, dataset versions, eval
runs and the registered model version (``links``, JSON). A step row keeps the
content hash of its inputs and its outputs, so the next run can skip a step
whose inputs did not change and reuse those outputs.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, String, Table, Text

from keel.store.tables import metadata

pipeline_runs = Table(
    "pipeline_runs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("pipeline", String(200), nullable=False),
    Column("file", Text),
    Column("status", String(16), nullable=False),  # queued | running | succeeded | failed
    Column("trigger_kind", String(16), nullable=False),  # cli | ci | schedule | alert
    Column("trigger_reason", Text),
    Column("error", Text),
    Column("links", Text),  # JSON {runs, datasets, eval_runs, registered, fine_tuned_models}
    Column("log_path", Text),
    Column("created_by", String(200)),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("started_at_ms", BigInteger),
    Column("ended_at_ms", BigInteger),
    Index("ix_pipeline_runs_pipeline_created", "pipeline", "created_at_ms"),
    Index("ix_pipeline_runs_created", "created_at_ms"),
)

pipeline_steps = Table(
    "pipeline_steps",
    metadata,
    Column("pipeline_run_id", String(32), primary_key=True),
    Column("name", String(200), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("position", BigInteger, nullable=False),
    # pending | running | succeeded | failed | skipped | not_run
    Column("status", String(16), nullable=False),
    Column("input_hash", String(64)),
    Column("outputs", Text),  # JSON
    Column("reused_from", String(32)),  # the pipeline run whose outputs a skipped step reuses
    Column("error", Text),
    Column("started_at_ms", BigInteger),
    Column("ended_at_ms", BigInteger),
    Index("ix_pipeline_steps_hash", "name", "input_hash"),
)
