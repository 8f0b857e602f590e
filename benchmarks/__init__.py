"""Benchmarks for vijax: run one with ``python -m benchmarks.<name>``."""
