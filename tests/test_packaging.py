"""`pip install llm_jax` is the losses library alone: a clean virtual environment
gets jax, numpy and chex, not the training stack, and the losses run there."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent("""
    import importlib.util, json
    import numpy as np
    import jax.numpy as jnp
    from llm_jax import losses

    # The training stack's packages are absent, and so is a top-level `experiments`.
    absent = ["flax", "optax", "orbax", "tensorflow_datasets", "grain", "tokenizers", "matplotlib",
              "torch", "experiments"]
    found = [m for m in absent if importlib.util.find_spec(m) is not None]
    assert not found, found

    # DPO on four pairs against the formula in numpy: -log sigmoid(beta * margin).
    pc, pr, rc, rr = (np.array(x, np.float32) for x in
                      ([-1.0, -2.0, -3.0, -0.5], [-2.0, -1.0, -3.5, -4.0], [-1.5, -1.5, -3.0, -1.0],
                       [-1.5, -1.5, -3.0, -1.0]))
    beta = 0.1
    margin = beta * ((pc - rc) - (pr - rr))
    want = float(np.mean(np.log1p(np.exp(-margin))))
    got = float(losses.dpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(rc), jnp.asarray(rr), beta=beta))
    assert abs(got - want) < 1e-6, (got, want)
    print(json.dumps({"ok": True}))
""")


@pytest.mark.slow
def test_light_install_in_a_clean_environment(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run(pip + ["install", "--quiet", ROOT], check=True, timeout=900,
                   env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"))
    names = subprocess.run(pip + ["list", "--format=freeze"], check=True, capture_output=True, text=True)
    installed = {line.split("==")[0].lower().replace("_", "-") for line in names.stdout.split()}
    assert {"jax", "jaxlib", "numpy", "chex", "llm-jax"} <= installed
    assert not installed & {"flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "grain", "tokenizers",
                            "matplotlib", "torch"}
    # Run from an empty directory, so the checkout is not on the path.
    res = subprocess.run([str(venv / "bin" / "python"), "-c", CHECK], capture_output=True, text=True,
                         cwd=str(tmp_path), timeout=300, env={"PATH": os.environ["PATH"], "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert '"ok": true' in res.stdout
