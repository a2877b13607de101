"""Pipelines: a spec of steps, a runner that skips unchanged steps, executors, triggers."""
