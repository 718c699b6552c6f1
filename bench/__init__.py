"""Benchmarks: `python -m bench [--only NAME] [--device cpu|cuda]` runs the suites and rewrites
bench/RESULTS.md; `pytest bench/` runs the same cases under pytest-benchmark."""
