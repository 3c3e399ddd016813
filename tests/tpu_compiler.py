"""Whether the TPU compiler (libtpu) is here, for the tests that compile for a TPU slice.

Locally a missing libtpu skips them; under CI (the CI variable set, as `.ci/run`
does) it fails them, since CI installs `.[tpu]` and must run the TPU compiles,
not skip them.
"""

import os

import jax
import pytest

INSTALL = f'pip install "jax[tpu]=={jax.__version__}"  (or pip install -e ".[tpu]")'


def require_libtpu(*, module_level: bool = False) -> None:
    try:
        import libtpu  # noqa: F401 - only whether it imports
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the TPU compile tests, not skip them: libtpu is missing; {INSTALL}",
                        pytrace=False)
        pytest.skip(f"the TPU compiler (libtpu) is not installed: {INSTALL}", allow_module_level=module_level)
