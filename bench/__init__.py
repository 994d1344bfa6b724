"""Benchmarks: each prints figures measured against a bare ProcessPoolExecutor in the same run."""
