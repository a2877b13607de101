"""The GitHub Actions workflow ``keel ci init github`` writes."""

from __future__ import annotations

_TEMPLATE = """\
# Written by `keel ci init github`. Pull requests: lint, tests, data validation and
# the evaluation gate. Pushes to main: the pipeline, which registers a candidate.
# Repository secrets: KEEL_URL (your Keel server), KEEL_API_KEY (a key with the user role).
name: keel
on:
  pull_request:
  push:
    branches: [main]
env:
  KEEL_URL: ${{{{ secrets.KEEL_URL }}}}
  KEEL_API_KEY: ${{{{ secrets.KEEL_API_KEY }}}}
jobs:
  check:
    if: github.event_name == 'pull_request'
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.12"
      - run: pip install keel ruff pytest
      - name: lint
        run: ruff check .
      - name: tests
        run: pytest -q
      - name: data validation
        run: keel data validate {dataset}
      - name: evaluation gate
        run: keel eval run {suite} --junit eval.xml --markdown eval.md
      - uses: actions/upload-artifact@v4
        if: always()
        with:
          name: eval-report
          path: eval.*
  pipeline:
    if: github.event_name == 'push'
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.12"
      - run: pip install keel
      - name: pipeline (registers a candidate version)
        run: keel pipeline run {pipeline}
"""


def github_workflow(pipeline: str, suite: str, dataset: str) -> str:
    """The workflow YAML for these repository paths."""
    return _TEMPLATE.format(pipeline=pipeline, suite=suite, dataset=dataset)
