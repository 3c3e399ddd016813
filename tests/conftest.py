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
                "test_packaging", "test_aot", "test_benchmark_device", "test_tpu_scripts", "test_plan",
                "test_loop", "test_checkpoint", "test_experiments", "test_rundir", "test_launch",
                "test_sharded_stages", "test_splash"}
# Single tests of otherwise fast modules that take 8 s or more on 2 cores.
SLOW_TESTS = ("test_lora.py::test_llama_sft_dpo_with_lora_smoke",
              "test_lora.py::test_attached_adapters_compute_the_merged_model_and_its_gradient",
              "test_classify.py::test_experiment_smoke_resume_and_handoff",
              "test_classify.py::test_short_training_beats_chance_on_heldout",
              "test_hf.py::test_llama_sft_dpo_from_hf_with_lora_exports_a_loadable_model",
              "test_hf.py::test_export_of_llm_jax_trained_shapes",
              "test_generate_cli.py::test_sampling_flags",
              "test_model.py::test_scan_unrolled_and_remat_agree_on_logits_and_gradients",
              "test_generate.py::test_top_k_and_top_p",
              "test_losses.py::test_docs_example_runs")


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        name = item.nodeid.split("/")[-1]
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or name.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
