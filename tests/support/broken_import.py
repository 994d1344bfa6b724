"""A module that exists but cannot be imported: a pool.preload that no worker survives."""

raise RuntimeError("tests.support.broken_import cannot be imported, on purpose")
