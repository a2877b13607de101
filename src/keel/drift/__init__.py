"""Drift: features of inputs and outputs, reference samples, statistical tests, monitors.

- :mod:`keel.drift.features`: per-trace features and the featurizer daemon;
- :mod:`keel.drift.tests`: the drift-test registry (PSI, KS, Wasserstein, chi²,
  Jensen-Shannon, MMD, topic shift);
- :mod:`keel.drift.reference`: the two sides of a comparison (window, dataset);
- :mod:`keel.drift.monitor`: runs monitors, stores and exports their results;
- :mod:`keel.drift.signals`: alert signals ``drift_score``, ``drift_p_value``,
  ``drift_detected``; :mod:`keel.drift.api` and :mod:`keel.drift.cli`.
"""
