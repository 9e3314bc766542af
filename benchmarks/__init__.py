"""Benchmarks, each run as `python benchmarks/NAME.py`; their figures are in RESULTS.md."""
