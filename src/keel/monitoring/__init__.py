"""Monitoring: Prometheus metrics, the resource sampler, component probes, summaries."""
