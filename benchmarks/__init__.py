"""Benchmarks for sqlalchemy-envelope: ``python benchmarks/run.py`` (docs/PERFORMANCE.md)."""
