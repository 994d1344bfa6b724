"""The process pool, usable alone: slots, the worker side, process trees.

Imports nothing of the store, HTTP or configuration."""
