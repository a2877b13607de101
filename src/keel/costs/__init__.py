"""Costs: the price catalog, the cost of each call, and cost reports.

- :mod:`keel.costs.catalog`: :class:`PriceCatalog` (shipped ``prices.yaml`` plus
  keel.yaml's ``prices:``) and :class:`Pricer`, which sets ``cost_usd`` on traces;
- :mod:`keel.costs.reports` and :mod:`keel.costs.api`: ``GET /api/costs``,
  ``/api/costs/by-input-length`` and ``/api/costs/compare``;
- :mod:`keel.costs.cli`: ``keel costs``.
"""

from keel.costs.catalog import Price, PriceCatalog, Pricer

__all__ = ["Price", "PriceCatalog", "Pricer"]
