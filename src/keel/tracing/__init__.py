"""Traces: the record of one call (and, later, spans from applications)."""

from keel.tracing.model import TraceRecord

__all__ = ["TraceRecord"]
