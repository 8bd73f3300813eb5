"""Benchmarks (run as ``python -m regionembed.bench ...``)."""
