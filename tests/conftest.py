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
