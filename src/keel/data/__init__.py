"""Datasets: streaming import, recorded preprocessing, content-hash versions.

Rows are plain dicts in one canonical shape per kind (see :mod:`keel.data.io`);
:class:`keel.data.versions.DatasetStore` writes them as immutable Parquet
versions under the artifact root and keeps their metadata and lineage in the
store; :func:`keel.data.prepare.prepare` runs recorded preprocessing steps.
"""

from __future__ import annotations

from keel.data.io import KINDS, DatasetError, from_traces, read_file, row_text, to_canonical
from keel.data.prepare import STEPS, parse_step, prepare
from keel.data.versions import DatasetStore, VersionInfo

__all__ = [
    "KINDS",
    "STEPS",
    "DatasetError",
    "DatasetStore",
    "VersionInfo",
    "from_traces",
    "parse_step",
    "prepare",
    "read_file",
    "row_text",
    "to_canonical",
]
