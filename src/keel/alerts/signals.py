"""Signals: named values the rule engine can watch. A new signal is one small class.

A :class:`Signal` computes its value over a window ending at ``end_ms``, for
every label set (grouped by ``group_by``, restricted by ``filters``). It runs in
a worker thread (it may query the store) with an :class:`EvalContext` whose
``cache`` lets signals that read the same rows share one query per tick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy.engine import Engine

from keel.alerts.model import Labels


@dataclass(frozen=True)
class SignalQuery:
    window_ms: int
    end_ms: int  # exclusive
    filters: tuple[tuple[str, str], ...] = ()
    group_by: tuple[str, ...] = ()


@dataclass
class EvalContext:
    engine: Engine
    now_ms: int
    cache: dict[Any, Any] = field(default_factory=dict)


class Signal:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    unit: ClassVar[str] = ""  # ratio, ms, count, percent, bytes, usd, seconds, per_s, per_min
    #: label keys usable in filters and group_by
    labels: ClassVar[tuple[str, ...]] = ()

    def values(self, ctx: EvalContext, q: SignalQuery) -> dict[Labels, float | None]:
        """Value per label set (keys are sorted (label, value) tuples; () when ungrouped).

        A label set with no data may be absent or map to None; the engine treats
        both as "no data" (the condition does not hold).
        """
        raise NotImplementedError

    def check(self, filters: dict[str, str], group_by: list[str]) -> None:
        """Raise ValueError when a rule uses labels this signal does not have."""
        for where, keys in (("filters", list(filters)), ("group_by", group_by)):
            bad = [k for k in keys if k not in self.labels]
            if bad:
                raise ValueError(
                    f"{where}: signal '{self.name}' has no label {', '.join(map(repr, bad))} "
                    f"(it has: {', '.join(self.labels) or 'none'})"
                )


SIGNALS: dict[str, Signal] = {}


def register_signal(cls: type[Signal]) -> type[Signal]:
    SIGNALS[cls.name] = cls()
    return cls
