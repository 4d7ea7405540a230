"""AETR's benchmark suite: `benchmarks/run` (or `python -m benchmarks`); see docs/performance.md."""
