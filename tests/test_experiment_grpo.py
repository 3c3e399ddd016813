"""experiments.grpo end to end on tiny settings: the built-in tasks with their
scorers, and a user's JSONL with a `module:function` verifier and held-out records."""

import json

import pytest

from experiments import grpo as experiment
from llm_jax.errors import ConfigError

TINY = ["--set", "model.d_model=32", "--set", "model.d_ff=64", "--set", "model.num_layers=1",
        "--set", "model.num_heads=2", "--set", "grpo.train.steps=2", "--set", "grpo.train.log_every=1",
        "--set", "grpo.prompts=8", "--set", "grpo.group_size=2", "--set", "grpo.max_new_tokens=4"]


def test_builtin_tasks_smoke(tmp_path):
    args = ["--workdir", str(tmp_path), *TINY, "--set", "builtin_prompts=50", "--set", "eval_per_task=1",
            "--set", 'tasks=["add", "reverse"]']
    assert experiment.main(args) == 0
    result = json.loads((tmp_path / "grpo" / "eval.json").read_text())
    assert set(result["by_task_before"]) == set(result["by_task_after"]) == {"add", "reverse"}
    assert 0.0 <= result["instruction_accuracy_after"] <= 1.0
    assert json.loads((tmp_path / "grpo" / "config.json").read_text())["verifier"] == "builtin"
    assert len((tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()) == 2


def test_jsonl_with_a_user_verifier_and_heldout_records(tmp_path):
    data, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {c}.", "answer": c}) + "\n" for c in "abcd")
                    + "not json\n")
    heldout.write_text("".join(json.dumps({"prompt": f"Say {c}.", "answer": c}) + "\n" for c in "ef"))
    args = ["--workdir", str(tmp_path / "run"), *TINY, "--set", f"data=jsonl:{data}",
            "--set", "verifier=tests.grpo_verifiers:answer_share", "--set", f"heldout=jsonl:{heldout}",
            "--set", "eval_max_new_tokens=4"]
    assert experiment.main(args) == 0
    result = json.loads((tmp_path / "run" / "grpo" / "eval.json").read_text())
    assert {"heldout_reward_before", "heldout_reward_after", "heldout_accuracy_after"} <= set(result)
    assert result["preflight"] == {"verifier": "tests.grpo_verifiers:answer_share", "records": 4}

    with pytest.raises(ConfigError, match="does not import"):
        experiment.main(["--workdir", str(tmp_path / "bad"), *TINY, "--set", f"data=jsonl:{data}",
                         "--set", "verifier=no_such_module_xyz:score"])
    assert not (tmp_path / "bad").exists()  # before anything is written


def test_from_a_hugging_face_directory_with_lora_and_export(tmp_path):
    """init_from=hf:DIR (a tiny Llama written by transformers, with its tokenizer) with LoRA,
    a KL term to the frozen base, and export_dir. The export loads in transformers: its q and
    v projections are the checkpoint's plus scale * (A @ B)^T of the adapters the run saved
    (numpy, here), every other weight is the checkpoint's own (the embeddings and output
    grown by the prompt template's two tokens), and its tokenizer encodes as DIR's."""
    import os

    import numpy as np
    import torch
    import transformers
    from test_hf import hf_tokenizer_dir, llama_model, saved

    from llm_jax import checkpoint, generate, lora, sharding
    from llm_jax.config import MeshConfig

    m = llama_model(tie=False, vocab_size=300, rope_scaling=None)
    d = saved(m, tmp_path, "base")
    tok_dir, fast = hf_tokenizer_dir(tmp_path)
    for name in os.listdir(tok_dir):  # one HF directory: weights and tokenizer
        os.replace(os.path.join(tok_dir, name), os.path.join(d, name))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {c}.", "answer": c}) + "\n" for c in "abcdefgh"))
    out = tmp_path / "exported"
    sets = [f"init_from=hf:{d}", f"data=jsonl:{data}", "verifier=tests.grpo_verifiers:answer_share",
            "lora.rank=2", "lora.alpha=4", 'lora.targets=["q","v"]', "grpo.kl_coef=0.1", f"export_dir={out}",
            "grpo.optim.lr=1e-2", "grpo.train.steps=2", "grpo.train.log_every=1", "grpo.prompts=8",
            "grpo.group_size=4", "grpo.max_new_tokens=4"]
    args = ["--workdir", str(tmp_path / "run")] + [x for s in sets for x in ("--set", s)]
    # The architecture is the checkpoint's: a model.* setting it contradicts is named, before any work.
    with pytest.raises(ConfigError, match=r"model\.d_model=32 \(the checkpoint has 64\)"):
        experiment.main(["--workdir", str(tmp_path / "clash")] + args[2:] + ["--set", "model.d_model=32"])
    assert not (tmp_path / "clash").exists()
    assert experiment.main(args) == 0

    config_path = str(tmp_path / "run" / "grpo" / "config.json")
    model_cfg = generate.model_config_from_dict(json.loads(open(config_path).read())["model"], config_path)
    assert model_cfg.d_model == 64 and model_cfg.vocab_size == len(fast) + 2 > 300
    lcfg = lora.LoRAConfig(rank=2, alpha=4.0, targets=("q", "v"))
    result = json.loads((tmp_path / "run" / "grpo" / "eval.json").read_text())
    assert result["lora"]["adapter_params"] == 2 * 2 * ((64 + 64) + (64 + 32))  # q 64->4x16, v 64->2x16
    mesh = sharding.make_mesh(MeshConfig())
    adapters = checkpoint.load_params(str(tmp_path / "run" / "grpo" / "checkpoints"),
                                      lora.abstract_adapters(lcfg, model_cfg, mesh))
    adapters = {t: {k: np.asarray(v, np.float64) for k, v in ab.items()}
                for t, ab in adapters["layers"]["attn"].items()}
    assert all(np.abs(ab["b"]).max() > 0 for ab in adapters.values())  # the adapters trained

    before = m.state_dict()
    after = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval().state_dict()
    assert after["model.embed_tokens.weight"].shape[0] == after["lm_head.weight"].shape[0] == len(fast) + 2
    for key, w in before.items():
        t = next((t for t in ("q", "v") if key.endswith(f"self_attn.{t}_proj.weight")), None)
        if t is None:  # untouched, up to the two new vocabulary rows
            assert torch.equal(after[key][:w.shape[0]], w), key
            continue
        i = int(key.split(".")[2])  # model.layers.{i}.self_attn...
        want = w.double().numpy() + lcfg.scale * (adapters[t]["a"][i] @ adapters[t]["b"][i]).T
        np.testing.assert_allclose(after[key].double().numpy(), want, rtol=1e-6, atol=1e-7, err_msg=key)
        assert not torch.equal(after[key], w), key
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Say a."
    assert auto(text, add_special_tokens=False)["input_ids"] == fast(text, add_special_tokens=False)["input_ids"]
