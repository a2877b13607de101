"""Validation results: :class:`CheckResult`, :class:`Report` and its text and
HTML renderings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class CheckResult:
    """What one check found: ``count`` offending rows, ≤ 5 ``examples``
    (``{"row": index, "reason": …}``) and free-form ``details``."""

    name: str
    severity: str
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def failed(self) -> bool:
        return self.count > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "severity": self.severity,
            "count": self.count,
            "examples": self.examples,
            "details": self.details,
            "description": self.description,
        }


_MARK = {"ok": "✓", "error": "✗", "warning": "!"}


@dataclass
class Report:
    """The outcome of :func:`validate`. ``ok`` is False when an error-severity
    check found something."""

    kind: str
    rows: int
    results: list[CheckResult]

    @property
    def ok(self) -> bool:
        return not self.failures("error")

    def failures(self, level: str = "error") -> list[CheckResult]:
        """Results with findings at ``level`` or worse (``warning`` includes errors)."""
        levels = {"error"} if level == "error" else {"error", "warning"}
        return [r for r in self.results if r.count and r.severity in levels]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "kind": self.kind,
            "rows": self.rows,
            "errors": len(self.failures("error")),
            "warnings": len(self.failures("warning")) - len(self.failures("error")),
            "results": [r.to_dict() for r in self.results],
        }

    def to_text(self) -> str:
        errors = len(self.failures("error"))
        warnings = len(self.failures("warning")) - errors
        head = "PASSED" if self.ok else "FAILED"
        lines = [
            f"Validation of {self.rows:,} {self.kind} rows: {head} "
            f"({errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)})"
        ]
        width = max([len(r.name) for r in self.results] + [4])
        for r in self.results:
            mark = _MARK[r.severity] if r.count else _MARK["ok"]
            sev = r.severity if r.count else ""
            summary = _summary(r)
            lines.append(f"{mark} {r.name:<{width}}  {sev:<7}  {r.count:>8,}  {summary}".rstrip())
            for ex in r.examples if r.count else ():
                where = f"row {ex['row']}" if ex.get("row") is not None else "-"
                lines.append(f"    {where}: {ex.get('reason', '')}")
        return "\n".join(lines)

    def to_html(self) -> str:
        import jinja2

        env = jinja2.Environment(autoescape=True)
        return env.from_string(_HTML).render(report=self, mark=_MARK, summary=_summary)


def _summary(r: CheckResult) -> str:
    d = r.details
    if r.name == "pii" and d.get("by_kind"):
        return ", ".join(f"{k.lower()}: {v}" for k, v in sorted(d["by_kind"].items()))
    if r.name == "token_length" and "tokenizer" in d:
        est = " (estimated)" if d.get("estimated") else ""
        limit = f"max {d['max_tokens']}" if d.get("max_tokens") else "no limit given"
        return f"{limit}, longest {d.get('longest_tokens')} tokens; {d['tokenizer']}{est}"
    if r.name == "near_duplicates" and d.get("clusters"):
        return f"{d['clusters']} clusters"
    if r.name == "label_balance" and d.get("classes"):
        return ", ".join(f"{k}: {v}" for k, v in list(d["classes"].items())[:6])
    if "error" in d:
        return str(d["error"])
    return r.description


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Keel data validation: {{ report.kind }}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.4em;
text-align:left;vertical-align:top}.error{color:#b00020}.warning{color:#a66300}.ok{color:#137333}
code{background:#f4f4f4;padding:0 .2em}ul{margin:0;padding-left:1.2em}
</style></head><body>
<h1>Data validation: <span class="{{ 'ok' if report.ok else 'error' }}">
{{ 'passed' if report.ok else 'failed' }}</span></h1>
<p>{{ report.rows }} {{ report.kind }} rows.</p>
<table><thead><tr><th></th><th>check</th><th>severity</th><th>count</th><th>examples</th>
</tr></thead><tbody>
{% for r in report.results %}
{% set cls = r.severity if r.count else 'ok' %}
<tr id="check-{{ r.name }}">
<td class="{{ cls }}">{{ mark[r.severity] if r.count else mark.ok }}</td>
<td><code>{{ r.name }}</code><br><small>{{ summary(r) }}</small></td>
<td class="{{ cls }}">{{ r.severity }}</td><td>{{ r.count }}</td>
<td><ul>{% for ex in r.examples %}<li>row {{ ex.row }}: {{ ex.reason }}</li>{% endfor %}</ul></td>
</tr>
{% endfor %}
</tbody></table></body></html>
"""
