"""Process entry points: each module is run as ``python -m benchmarks._workers.<name>``.

Every consumer, router and producer under test is its own process, for both systems, so
CPU/GIL contention is the same for both and RSS is measured per process.
"""
