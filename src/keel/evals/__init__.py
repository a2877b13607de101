"""Evaluation: evaluators, offline experiments and online evaluation of traffic."""
