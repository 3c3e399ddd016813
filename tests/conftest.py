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

# The slow end-to-end, multi-process, install, subprocess and compile-for-TPU modules:
# CI runs everything (`python -m pytest`); `python -m pytest -m "not slow"` runs the
# fast core. Marked here, in one list, rather than in each file. Times are seconds
# measured on the 2-core dev machine under a load average of 4 to 6.
SLOW_MODULES = {
    "test_multiprocess",  # 2 JAX processes over gloo, SIGKILL and rerun
    "test_experiment_gpt2_pretrain", "test_experiment_bert_mlm",  # experiments on TFDS mock data
    "test_experiment_llama_sft_dpo", "test_experiment_pretrain",  # experiments end to end
    "test_experiment_classify", "test_experiment_grpo",
    "test_packaging",  # pip installs into a fresh virtual environment
    "test_aot", "test_splash",  # TPU compiles with libtpu, Pallas in interpret mode
    "test_benchmark_device", "test_benchmark_core",  # benchmarks' --tiny runs, a subprocess per round
    "test_benchmark_grpo",  # benchmarks.grpo --tiny: two models' compiles and GRPO steps (18 s)
    "test_benchmark_rl_compare",  # benchmarks.rl_compare: six methods trained and judged, tiny (35-60 s)
    "test_benchmark_sft_demos",  # benchmarks.sft_demos: a tiny SFT stage, two SFT runs, each judged (12 s)
    "test_tpu_scripts",  # the tpu/ shell scripts against a fake gcloud
    "test_plan",  # real sharded states and XLA's memory analysis on 8 devices
    "test_loop", "test_checkpoint", "test_rundir",  # stage runs with checkpoints, resume, signals
    "test_launch",  # launcher subprocesses, signals and timeouts
    "test_sharded_stages",  # every stage compiled on 8-device meshes
}
# Single tests of otherwise fast modules.
SLOW_TESTS = (
    "test_experiment_pipeline.py::test_pipeline_smoke",  # the main job end to end, every stage
    # Training runs that assert learning (a jitted loop of 8 to 250 steps; 4-11 s each).
    "test_stage_classify.py::test_short_training_beats_chance_on_heldout",
    "test_stage_reward.py::test_training_on_builtin_preferences_beats_chance_on_held_out_pairs",
    "test_stage_sft.py::test_training_lowers_the_loss_and_leaves_the_reference_alone",
    "test_stage_mlm.py::test_training_lowers_heldout_masked_token_loss",
    "test_stage_dpo.py::test_a_few_dpo_steps_open_a_positive_reward_margin",
    "test_stage_ppo.py::test_ppo_raises_a_program_reward_with_adaptive_kl_and_resumes_exactly",
    "test_train.py::test_training_learns_a_pattern",
    "test_lora.py::test_sft_with_lora_trains_adapters_and_never_touches_the_base",
    "test_lora.py::test_reward_model_with_lora_trains_adapters_and_head_only",
    "test_lora.py::test_dpo_with_lora_uses_the_base_as_reference",
    # A compile of the whole train step per microbatch count or mesh, after a 3-step
    # reference run (the fixture alone is 9 s; the tests 5-18 s each).
    "test_train.py::test_loss_matches_hand_computed_reference",
    "test_train.py::test_gradient_accumulation_is_exact",
    "test_train.py::test_meshes_match_one_device",
    "test_train.py::test_accumulation_on_a_mesh",
    "test_train.py::test_state_from_params_keeps_the_weights_and_shards_them",  # 8 devices, 10 s
    "test_train.py::test_fsdp_state_is_split_not_copied",  # a sharded init on 8 devices, 3-9 s
    # PPO updates on a hand-built rollout: the scored reference (6 s) and the update
    # fixtures (22 s), the first minibatch (15 s), reward-model and eos variants (5-7 s).
    "test_stage_ppo.py::test_scoring_matches_each_sequence_alone",
    "test_stage_ppo.py::test_without_whitening_the_scored_advantages_are_the_raw_gae",
    "test_stage_ppo.py::test_first_update_loss_is_raw_policy_loss_plus_vf_coef_times_value_loss",
    "test_stage_ppo.py::test_update_microbatches_give_the_same_update",
    "test_stage_ppo.py::test_first_minibatch_ratio_one_and_loss_is_minus_mean_advantage",
    "test_stage_ppo.py::test_likelihood_reward_model_adds_its_mean_response_logprob",
    "test_stage_ppo.py::test_missing_eos_penalty_lowers_only_the_cut_off_responses_last_reward",
    "test_stage_ppo.py::test_run_stage_checkpoints_beta_and_resumes",  # run_stage with checkpoints
    # Stage variants compiled on top of the loss-vs-numpy tests (11-15 s each).
    "test_stage_reward.py::test_likelihood_reward_model_in_packed_batches_scoring_and_loss",
    "test_stage_sft.py::test_kl_is_zero_against_itself_and_frozen_gets_no_gradient",
    # GRPO and the stage runner (files being written as this list was made: check the
    # names when they change): training and stop/resume runs, several updates (9-15 s
    # each), and the advantage variants beyond plain GRPO's numpy check (7-9 s each).
    "test_stage_grpo.py::test_grpo_raises_the_reward_of_a_toy_verifiable_task",
    "test_stage_grpo.py::test_stopped_and_resumed_run_equals_an_uninterrupted_one_bitwise",
    "test_stage_grpo.py::test_several_updates_score_old_logprobs_and_start_at_ratio_one",
    "test_stage_grpo.py::test_rewards_advantages_and_loss_match_a_numpy_recomputation[dr_grpo]",
    "test_stage_grpo.py::test_rewards_advantages_and_loss_match_a_numpy_recomputation[rloo]",
    "test_stage_grpo.py::test_rewards_advantages_and_loss_match_a_numpy_recomputation[dapo]",
    "test_runner.py::test_a_stage_runs_records_and_is_skipped_when_finished",
    "test_runner.py::test_an_early_stop_resumes_to_the_uninterrupted_result",
    "test_runner.py::test_lora_trains_adapters_over_the_frozen_initial_weights",
    # LoRA for a stage that builds its own step: a toy step run through the runner (10 s),
    # a GRPO step with adapters checked against numpy (15-30 s).
    "test_runner.py::test_a_built_step_with_lora_trains_the_runners_adapters_over_the_frozen_base",
    "test_stage_grpo.py::test_lora_samples_from_base_plus_adapters_and_the_base_is_the_reference",
    # End to end through an experiment or the CLI (8 s or more).
    "test_lora.py::test_llama_sft_dpo_with_lora_smoke",
    "test_lora.py::test_attached_adapters_compute_the_merged_model_and_its_gradient",
    "test_hf.py::test_llama_sft_dpo_from_hf_with_lora_exports_a_loadable_model",
    "test_hf.py::test_export_of_llm_jax_trained_shapes",
    "test_generate_cli.py::test_sampling_flags",
    "test_model.py::test_scan_unrolled_and_remat_agree_on_logits_and_gradients",
    "test_generate.py::test_top_k_and_top_p",
    "test_losses.py::test_docs_example_runs",
)


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        name = item.nodeid.split("/")[-1]
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or name.startswith(SLOW_TESTS):
            item.add_marker(pytest.mark.slow)
