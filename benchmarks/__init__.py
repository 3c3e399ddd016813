"""Benchmarks for llm_jax (not part of the package). Run `python -m benchmarks.core`."""
