"""Test session setup: 8 host CPU devices for the mesh tests.

XLA reads the flag once, when the backend starts, so it is set here before any
test module imports jax. Single-device tests pick `jax.devices()[:1]` or just
run unsharded (jit places work on device 0).
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The slow end-to-end, multi-process, install and compile-for-TPU modules: CI runs
# everything; `python -m pytest -m "not slow"` runs the fast core in a few minutes
# on 2 cores. Marked here, in one list, rather than in each file.
SLOW_MODULES = {"test_multiprocess", "test_pipeline", "test_experiments_real", "test_experiment_llama",
                "test_packaging", "test_aot", "test_benchmark_device", "test_tpu_scripts"}


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
