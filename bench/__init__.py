"""Throughput and utilisation profiling, the open_clip anchor, and loss micro-benchmarks.

``python -m bench.throughput`` (per method and batch size), ``python -m bench.vs_open_clip``
(the harness's clip step against open_clip's own trainer), ``pytest bench/`` (pytest-benchmark
micro-benchmarks of every method's loss; not part of the default test run). Results are written
under ``reports/bench/``; the bench may import the harness, ``reports/`` never does.
"""
