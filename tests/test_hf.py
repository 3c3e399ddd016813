"""Hugging Face interop against `transformers` itself (PyTorch, random weights saved
locally): import -> same logits, export -> transformers loads it -> same logits.

The reference numbers are PyTorch's forward passes of the real HF model classes,
an implementation independent of llm_jax. Tolerance: 1e-4 of the logits' scale
(float32 on both sides; the ops differ in order, not in what they compute).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from llm_jax import cli, hf, model
from llm_jax.config import ConfigError, ModelConfig, apply_overrides
from llm_jax.data import formats
from llm_jax.data.tokenizer import HfTokenizer, TokenizerError, load_hf_tokenizer, load_tokenizer

RTOL = 1e-4
transformers.logging.set_verbosity_error()


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def torch_logits(m, tokens, **kw) -> np.ndarray:
    with torch.no_grad():
        return m(torch.as_tensor(np.asarray(tokens), dtype=torch.long), **kw).logits.numpy()


def saved(m, tmp_path, name, **kw) -> str:
    torch.manual_seed(0)
    d = str(tmp_path / name)
    m.eval().save_pretrained(d, **kw)
    return d


def randomize_norms(m, seed=0):
    """HF initialises norm scales to 1 and biases to 0; random ones make a
    swapped or misread norm visible in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name.lower() or name.endswith("bias") or "ln_" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g))
    return m


TOKENS = np.random.default_rng(0).integers(0, 97, (2, 20))


def gpt2_model(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  **kw)
    return randomize_norms(transformers.GPT2LMHeadModel(cfg)).eval()


def llama_model(tie=False, **kw):
    torch.manual_seed(1)
    # original_max_position_embeddings=16 puts the 8 rotary frequencies of a
    # head of 16 in all three of Llama 3's regions (kept, blended, slowed).
    defaults = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                    rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tie,
                    rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    cfg = transformers.LlamaConfig(**{**defaults, **kw})
    return randomize_norms(transformers.LlamaForCausalLM(cfg)).eval()


def bert_model():
    torch.manual_seed(2)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, type_vocab_size=2)
    return randomize_norms(transformers.BertForMaskedLM(cfg)).eval()


def ours(cfg, params, tokens, **kw):
    return np.asarray(model.apply(cfg, jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), **kw))


# ---------------------------------------------------------------------------
# Import: same logits as transformers


def test_gpt2_import_matches_transformers(tmp_path):
    m = gpt2_model()
    cfg, params = hf.load_pretrained(saved(m, tmp_path, "gpt2"))
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.use_bias, cfg.tie_embeddings) == (
        "learned", "layernorm", "gelu", True, True)
    assert rel_err(ours(cfg, params, TOKENS), torch_logits(m, TOKENS)) < RTOL


@pytest.mark.parametrize("tie", [False, True])
def test_llama_gqa_import_matches_transformers(tmp_path, tie):
    m = llama_model(tie=tie)
    cfg, params = hf.load_pretrained(saved(m, tmp_path, "llama"))
    assert (cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.rope_scaling) == (4, 2, 16, "llama3")
    assert ("lm_head" in params) == (not tie)
    tokens = np.random.default_rng(1).integers(0, 97, (2, 40))  # past original_max_position_embeddings
    assert rel_err(ours(cfg, params, tokens), torch_logits(m, tokens)) < RTOL


def test_llama3_rope_scaling_matters(tmp_path):
    """The scaled frequencies are really used: plain RoPE misses the parity
    tolerance by far (random small weights make attention only mildly
    position-dependent, hence 'far' is 10x, not more)."""
    m = llama_model()
    cfg, params = hf.load_pretrained(saved(m, tmp_path, "llama"))
    tokens = np.random.default_rng(1).integers(0, 97, (2, 40))
    plain = ours(dataclasses.replace(cfg, rope_scaling="none"), params, tokens)
    assert rel_err(plain, torch_logits(m, tokens)) > 10 * RTOL


def test_mistral_import_matches_transformers(tmp_path):
    torch.manual_seed(3)
    cfg = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=32,
                                     sliding_window=None)
    m = randomize_norms(transformers.MistralForCausalLM(cfg)).eval()
    ccfg, params = hf.load_pretrained(saved(m, tmp_path, "mistral"))
    assert rel_err(ours(ccfg, params, TOKENS), torch_logits(m, TOKENS)) < RTOL


def test_bert_import_matches_transformers_with_padding_and_token_types(tmp_path):
    m = bert_model()
    cfg, params = hf.load_pretrained(saved(m, tmp_path, "bert"))
    assert (cfg.causal, cfg.norm_position, cfg.mlp, cfg.type_vocab_size) == (False, "post", "gelu_exact", 2)
    tokens = TOKENS[:, :16]
    types = np.zeros_like(tokens)
    types[:, 9:] = 1
    mask = np.ones_like(tokens)
    mask[1, 12:] = 0  # row 1 is padded after 12 tokens
    want = torch_logits(m, tokens, token_type_ids=torch.as_tensor(types),
                        attention_mask=torch.as_tensor(mask))
    got = ours(cfg, params, tokens, token_types=jnp.asarray(types), segment_ids=jnp.asarray(mask))
    real = mask.astype(bool)
    assert rel_err(got[real], want[real]) < RTOL
    # Without token types HF's BERT adds type 0 everywhere, as forward does.
    assert rel_err(ours(cfg, params, tokens), torch_logits(m, tokens)) < RTOL


def test_sharded_bfloat16_checkpoint(tmp_path):
    """A sharded checkpoint (index.json) in bfloat16 reads as the same weights."""
    m = llama_model().to(torch.bfloat16)
    d = saved(m, tmp_path, "sharded", max_shard_size="20KB")
    assert os.path.exists(os.path.join(d, hf.INDEX_FILE))
    cfg, params = hf.load_pretrained(d)
    want = m.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()  # [G*H, D]
    got = params["layers"]["attn"]["k"][1].reshape(cfg.d_model, -1).T
    np.testing.assert_array_equal(got, want)
    cfg16, params16 = hf.load_pretrained(d, param_dtype="bfloat16")
    assert cfg16.param_dtype == "bfloat16" and params16["embed"].dtype == ml_dtypes.bfloat16


def test_bfloat16_checkpoint_loads_as_bfloat16_without_a_float32_copy(tmp_path):
    """Loaded as bfloat16, a bfloat16 checkpoint costs about its own size in host
    memory (a float32 round trip peaked at 3x: 16 GB of Llama-8B needing 48), the
    weights are the float32 load's rounded, and the arrays own their memory
    (the params do not hold the memory-mapped files)."""
    import tracemalloc
    m = llama_model(vocab_size=1000, hidden_size=256, intermediate_size=688, head_dim=64,
                    num_hidden_layers=4).to(torch.bfloat16)
    d = saved(m, tmp_path, "bf16")
    tracemalloc.start()
    try:
        _, params16 = hf.load_pretrained(d, param_dtype="bfloat16")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    leaves16 = jax.tree.leaves(params16)
    nbytes = sum(a.nbytes for a in leaves16)
    assert peak < 1.5 * nbytes, (peak, nbytes)
    def owner(a):  # the array at the end of a view chain (a memory-mapped file's is not an owner)
        while isinstance(a.base, np.ndarray):
            a = a.base
        return a
    assert all(a.dtype == ml_dtypes.bfloat16 and owner(a).flags.owndata for a in leaves16)
    _, params32 = hf.load_pretrained(d)
    for a16, a32 in zip(leaves16, jax.tree.leaves(params32)):
        np.testing.assert_array_equal(a16, a32.astype(ml_dtypes.bfloat16))


def test_safetensors_reader_and_writer_agree_with_the_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": torch.randn(3, 5, dtype=torch.bfloat16), "b": torch.arange(7, dtype=torch.int64),
               "c": torch.randn(2, 2, 2).half(), "d": torch.randn(4)}
    path = str(tmp_path / "lib.safetensors")
    save_file(tensors, path)
    ours_read = hf.read_safetensors(path)
    for k, v in tensors.items():
        np.testing.assert_array_equal(np.asarray(ours_read[k], np.float64), v.double().numpy())
    # Ours written, the library read.
    from safetensors.numpy import load_file
    arrays = {"x": rng.standard_normal((3, 4)).astype(np.float32), "y": np.arange(5, dtype=np.int32)}
    hf.write_safetensors(str(tmp_path / "ours.safetensors"), arrays)
    back = load_file(str(tmp_path / "ours.safetensors"))
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])


# ---------------------------------------------------------------------------
# Export: transformers loads what we write, with the same logits


def reload_logits(directory, auto, tokens, **kw):
    m = auto.from_pretrained(directory).eval()
    return torch_logits(m, tokens, **kw)


@pytest.mark.parametrize("maker,auto", [
    (gpt2_model, transformers.AutoModelForCausalLM),
    (llama_model, transformers.AutoModelForCausalLM),
    (lambda: llama_model(tie=True, rope_scaling=None), transformers.AutoModelForCausalLM),
    (bert_model, transformers.AutoModelForMaskedLM),
])
def test_import_export_round_trip(tmp_path, maker, auto):
    m = maker()
    cfg, params = hf.load_pretrained(saved(m, tmp_path, "in"))
    out = str(tmp_path / "out")
    hf.save_pretrained(out, cfg, params)
    tokens = TOKENS[:, :16]
    assert rel_err(reload_logits(out, auto, tokens), torch_logits(m, tokens)) < RTOL
    cfg2, params2 = hf.load_pretrained(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=101, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=32,
                positions="learned", norm="layernorm", mlp="gelu", use_bias=True),
    ModelConfig(vocab_size=101, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                max_len=32, tie_embeddings=False, rope_theta=1000.0),
], ids=["gpt2", "llama"])
def test_export_of_llm_jax_trained_shapes(tmp_path, cfg):
    """Params made by llm_jax (not imported) export to the family their shape is."""
    params = model.init(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(1), a.shape), params)
    out = str(tmp_path / "out")
    family = hf.save_pretrained(out, cfg, params)
    assert family == ("gpt2" if cfg.positions == "learned" else "llama")
    tokens = np.random.default_rng(3).integers(0, 101, (2, 12))
    got = reload_logits(out, transformers.AutoModelForCausalLM, tokens)
    assert rel_err(got, ours(cfg, params, tokens)) < RTOL


def test_export_refuses_a_model_no_family_has(tmp_path):
    cfg = ModelConfig(positions="sinusoidal")  # no HF family uses sinusoidal positions
    params = model.init(cfg, jax.random.PRNGKey(0))
    with pytest.raises(hf.HFError, match="positions='sinusoidal'"):
        hf.save_pretrained(str(tmp_path / "x"), cfg, params)


BERT_SHAPE = dict(vocab_size=97, d_model=32, num_layers=1, num_heads=4, d_ff=64, max_len=32, causal=False,
                  positions="learned", norm="layernorm", norm_position="post", mlp="gelu_exact",
                  use_bias=True, type_vocab_size=2, lm_head_transform=True, lm_head_bias=True)


@pytest.mark.parametrize("kw,match", [
    (dict(num_kv_heads=2), r"bert: model\.num_kv_heads=2 \(needs None or num_heads=4"),
    (dict(head_dim=16), r"bert: model\.head_dim=16 \(needs None or d_model/num_heads=8\)"),
], ids=["gqa", "head_dim"])
def test_export_refuses_bert_shapes_its_attention_cannot_hold(tmp_path, kw, match):
    """BERT's q/k/v/o are [d_model, d_model] like GPT-2's: GQA or another head_dim is named, not a reshape error."""
    assert hf.family_of(ModelConfig(**BERT_SHAPE)) == "bert"
    cfg = ModelConfig(**BERT_SHAPE, **kw)
    params = model.init(cfg, jax.random.PRNGKey(0))
    with pytest.raises(hf.HFError, match=match):
        hf.save_pretrained(str(tmp_path / "x"), cfg, params)


def test_resize_vocab_keeps_old_logits(tmp_path):
    m = gpt2_model()
    cfg, params = hf.load_pretrained(saved(m, tmp_path, "gpt2"))
    big_cfg, big = hf.resize_vocab(cfg, params, cfg.vocab_size + 2)
    got = ours(big_cfg, big, TOKENS)
    assert got.shape[-1] == 99
    assert rel_err(got[..., :97], torch_logits(m, TOKENS)) < RTOL
    np.testing.assert_allclose(big["embed"][97], params["embed"].mean(0), rtol=1e-6)


# ---------------------------------------------------------------------------
# Bad input: clear errors naming the file and the setting


def test_refuses_pickle_and_names_it(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(gpt2_model().config.to_dict()))
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(hf.HFError, match="pickle files are never loaded"):
        hf.load_pretrained(str(d))


def test_unsupported_settings_are_named(tmp_path):
    d = saved(gpt2_model(scale_attn_by_inverse_layer_idx=True), tmp_path, "g")
    with pytest.raises(hf.HFError, match="scale_attn_by_inverse_layer_idx=True"):
        hf.load_pretrained(d)
    hfcfg = hf.read_config(saved(llama_model(), tmp_path, "l"))
    with pytest.raises(hf.HFError, match="sliding_window=8"):
        hf.config_from_hf({**hfcfg, "model_type": "mistral", "sliding_window": 8})
    with pytest.raises(hf.HFError, match="'yarn'"):
        hf.config_from_hf({**hfcfg, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    with pytest.raises(hf.HFError, match="model_type='t5'"):
        hf.config_from_hf({"model_type": "t5"})
    with pytest.raises(hf.HFError, match="no config.json"):
        hf.load_pretrained(str(tmp_path))


def test_wrong_shape_and_extra_tensors_are_named(tmp_path):
    d = saved(llama_model(), tmp_path, "l")
    tensors = {k: np.array(v) for k, v in hf.read_safetensors(os.path.join(d, hf.WEIGHTS_FILE)).items()}
    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 64), np.float32)
    hf.write_safetensors(os.path.join(d, hf.WEIGHTS_FILE), bad)
    with pytest.raises(hf.HFError, match=r"model.layers.1.mlp.up_proj.weight has shape \(5, 64\)"):
        hf.load_pretrained(d)
    extra = dict(tensors, **{"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
    hf.write_safetensors(os.path.join(d, hf.WEIGHTS_FILE), extra)
    with pytest.raises(hf.HFError, match="q_norm"):
        hf.load_pretrained(d)
    del tensors["model.norm.weight"]
    hf.write_safetensors(os.path.join(d, hf.WEIGHTS_FILE), tensors)
    with pytest.raises(hf.HFError, match="tensor norm.weight is missing"):
        hf.load_pretrained(d)


def test_bert_without_mlm_head(tmp_path):
    torch.manual_seed(0)
    m = transformers.BertModel(bert_model().config).eval()
    d = saved(m, tmp_path, "bertmodel")
    with pytest.raises(hf.HFError, match="init_missing_head=True"):
        hf.load_pretrained(d)
    cfg, params = hf.load_pretrained(d, init_missing_head=True)
    with torch.no_grad():
        want = m(torch.as_tensor(TOKENS[:, :16])).last_hidden_state.numpy()
    got = model.forward(cfg, jax.tree.map(jnp.asarray, params), jnp.asarray(TOKENS[:, :16]))
    assert rel_err(got, want) < RTOL


# ---------------------------------------------------------------------------
# Tokenizer: a HF tokenizer.json as the run's tokenizer


def hf_tokenizer_dir(tmp_path) -> tuple[str, transformers.PreTrainedTokenizerFast]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|pad|>", "<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["Translate Blume from German to English.", "flower", "Hund -> dog"] * 20,
                            trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>",
                                                eos_token="<|end|>", pad_token="<|pad|>")
    d = str(tmp_path / "tok")
    fast.save_pretrained(d)
    return d, fast


def test_hf_tokenizer_encodes_like_transformers_and_round_trips(tmp_path):
    d, fast = hf_tokenizer_dir(tmp_path)
    tok = load_hf_tokenizer(d)
    text = "Translate Blume from German to English."
    assert tok.encode(text) == fast(text, add_special_tokens=False)["input_ids"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, None)
    # The template markers are added after the HF vocabulary.
    assert (tok.prompt_id, tok.response_id) == (fast.vocab_size, fast.vocab_size + 1)
    assert tok.vocab_size == fast.vocab_size + 2
    ids = formats.prompt_tokens(tok, text)
    assert ids[:2] == [1, tok.prompt_id] and ids[-1] == tok.response_id
    assert tok.decode(ids) == text
    tok.save(str(tmp_path / "run_tok"))
    again = load_tokenizer(str(tmp_path / "run_tok"))
    assert isinstance(again, HfTokenizer) and again.encode(text) == tok.encode(text)
    assert (again.prompt_id, again.vocab_size) == (tok.prompt_id, tok.vocab_size)
    # save_hf writes what AutoTokenizer reads back, markers included.
    tok.save_hf(str(tmp_path / "export"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    assert auto.convert_tokens_to_ids("<response>") == tok.response_id
    assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_hf_tokenizer(str(tmp_path))
    d, _ = hf_tokenizer_dir(tmp_path)
    config = json.load(open(os.path.join(d, "tokenizer_config.json")))
    for k in ("bos_token", "eos_token", "pad_token"):
        config.pop(k, None)
    json.dump(config, open(os.path.join(d, "tokenizer_config.json"), "w"))
    if os.path.exists(os.path.join(d, "special_tokens_map.json")):
        os.remove(os.path.join(d, "special_tokens_map.json"))
    with pytest.raises(TokenizerError, match="no bos token"):
        load_hf_tokenizer(d)


# ---------------------------------------------------------------------------
# Export CLI: a stage of a run directory


def export_cli(*argv) -> int:
    """The exit status of `python -m llm_jax.hf export *argv`, run as `__main__` runs it."""
    return cli.run(lambda: hf.main(["export", *argv]))


def test_export_cli_writes_any_lm_stage(tmp_path, capsys):
    import reference_model as ref
    from test_generate_cli import CFG, WEIGHTS, save_stage
    from llm_jax.data.tokenizer import train_bpe

    workdir = str(tmp_path / "run")
    head = {"kernel": jnp.ones((CFG.d_model,)), "bias": jnp.zeros(())}
    # Each stage, and the PPO value model, has its own weights: exporting the wrong
    # stage or subtree gives another model's logits.
    save_stage(workdir, "sft", WEIGHTS["sft"])
    save_stage(workdir, "ppo", {"policy": WEIGHTS["policy"], "value": {"model": WEIGHTS["value"], "head": head}})
    save_stage(workdir, "rm", {"model": WEIGHTS["reward"], "head": head})
    tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 10))
    # expected: the float64 reference model (tests/reference_model.py) on each stage's own weights
    want = {w: ref.reference_logits(CFG, WEIGHTS[w], tokens) for w in ("sft", "policy", "value")}
    assert min(rel_err(want[a], want[b]) for a, b in [("sft", "policy"), ("sft", "value"),
                                                       ("policy", "value")]) > 100 * RTOL
    for stage, weights in (("sft", "sft"), ("ppo", "policy")):
        out = str(tmp_path / f"hf_{stage}")
        assert export_cli("--workdir", workdir, "--stage", stage, "--out", out) == 0
        assert json.loads(capsys.readouterr().out)["family"] == "llama"
        assert rel_err(reload_logits(out, transformers.AutoModelForCausalLM, tokens), want[weights]) < RTOL
    assert export_cli("--workdir", workdir, "--stage", "rm", "--out", str(tmp_path / "x")) == 2
    assert "scalar model" in capsys.readouterr().err
    assert export_cli("--workdir", workdir, "--stage", "nope", "--out", str(tmp_path / "x")) == 2
    assert "stages in" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")  # --out naming a file: one line, not a FileExistsError traceback
    assert export_cli("--workdir", workdir, "--stage", "sft", "--out", str(tmp_path / "a_file")) == 2
    assert "error: --out" in capsys.readouterr().err
    # A BPE run tokenizer goes along, loadable by AutoTokenizer with the same ids.
    bpe = train_bpe(["Translate Blume from German to English.", "flower"] * 10, 300)
    bpe.save(os.path.join(workdir, "tokenizer"))
    big = dataclasses.replace(CFG, vocab_size=300)
    save_stage(workdir, "big", model.init(big, jax.random.PRNGKey(2)), cfg=big)
    bpe.save(os.path.join(workdir, "tokenizer"))  # save_stage wrote the byte tokenizer over it
    out = str(tmp_path / "hf_big")
    assert export_cli("--workdir", workdir, "--stage", "big", "--out", out) == 0
    auto = transformers.AutoTokenizer.from_pretrained(out)
    text = "Translate Blume"
    assert auto(text, add_special_tokens=False)["input_ids"] == bpe.encode(text)
    assert auto.eos_token_id == bpe.eos_id


# ---------------------------------------------------------------------------
# The whole path from a HF checkpoint: experiments.llama_sft_dpo with init_from=hf:


def test_llama_sft_dpo_from_hf_with_lora_exports_a_loadable_model(tmp_path, capsys):
    import random

    from jsonl_files import write_jsonl

    from experiments import llama_sft_dpo
    from llm_jax.data import builtin, preferences

    m = llama_model(tie=False, vocab_size=300, rope_scaling=None)
    d = saved(m, tmp_path, "base")
    tok_dir, fast = hf_tokenizer_dir(tmp_path)
    for name in os.listdir(tok_dir):  # one HF directory: weights and tokenizer
        os.replace(os.path.join(tok_dir, name), os.path.join(d, name))
    assert fast.vocab_size <= 300
    rng = random.Random(0)
    sft_rows = [{k: builtin.sft_record(rng, "train")[k] for k in ("prompt", "response")} for _ in range(24)]
    pref_rows = [{k: v for k, v in preferences.preference_record(rng, "train").items()
                  if k in ("prompt", "chosen", "rejected")} for _ in range(24)]
    write_jsonl(str(tmp_path / "sft.jsonl"), sft_rows)
    write_jsonl(str(tmp_path / "prefs.jsonl"), pref_rows)
    out = str(tmp_path / "exported")
    sets = [f"init_from=hf:{d}", "lora.rank=2", 'lora.targets=["q","v"]', f"export_dir={out}",
            "model.scan_layers=false",  # a runtime field: kept; the architecture is the checkpoint's
            f"sft.data.source=jsonl:{tmp_path / 'sft.jsonl'}", f"dpo.data.source=jsonl:{tmp_path / 'prefs.jsonl'}",
            "sft.optim.lr=1e-2", "sft.optim.warmup_steps=0", "dpo.optim.lr=1e-2", "dpo.optim.warmup_steps=0",
            "sft.train.steps=2", "sft.train.batch_size=8", "sft.train.seq_len=64", "sft.data.max_segments=4",
            "dpo.train.steps=1", "dpo.train.batch_size=8", "dpo.train.seq_len=64", "dpo.data.max_segments=4",
            f"sft.data.cache_dir={tmp_path / 'cache'}", f"dpo.data.cache_dir={tmp_path / 'cache'}"]
    workdir = str(tmp_path / "run")
    argv = ["--workdir", workdir] + [x for s in sets for x in ("--set", s)]
    # A model.* setting the checkpoint contradicts is named, not silently dropped
    # (max_len=64 is the checkpoint's own value, so that one alone is accepted).
    with pytest.raises(ConfigError, match=r"model\.num_layers=3 \(the checkpoint has 2\), "
                                          r"model\.max_len=128 \(the checkpoint has 64\);"):
        llama_sft_dpo.main(["--workdir", str(tmp_path / "clash")] + argv[2:]
                           + ["--set", "model.max_len=128", "--set", "model.num_layers=3"])
    llama_sft_dpo.with_hf_model(apply_overrides(llama_sft_dpo.Config(), [f"init_from=hf:{d}", "model.max_len=64"]),
                                load_hf_tokenizer(d))
    assert llama_sft_dpo.main(argv) == 0
    run = json.load(open(os.path.join(workdir, "run.json")))
    vocab = len(fast) + 2  # the tokenizer lacked <prompt>/<response>: two rows more
    assert vocab > 300 and run["config"]["model"]["d_model"] == 64
    assert run["config"]["model"]["scan_layers"] is False
    assert run["config"]["model"]["vocab_size"] == vocab
    # The export loads in transformers; only the adapted projections moved, the
    # embeddings and output matrix only by their two new rows.
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    before, after = m.state_dict(), exported.state_dict()
    assert after["model.embed_tokens.weight"].shape[0] == after["lm_head.weight"].shape[0] == vocab
    changed = sorted(k for k in before if not torch.equal(before[k], after[k][:before[k].shape[0]]))
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    auto = transformers.AutoTokenizer.from_pretrained(out)
    text = "Translate Blume from German to English."
    assert auto(text, add_special_tokens=False)["input_ids"] == fast(text, add_special_tokens=False)["input_ids"]
    # A mistake in the HF directory stops at once, naming it.
    os.remove(os.path.join(d, "config.json"))
    from llm_jax.cli import run as run_main
    assert run_main(lambda: llama_sft_dpo.main(["--workdir", str(tmp_path / "run2")] + argv[2:])) == 2
    assert "no config.json" in capsys.readouterr().err


def test_import_and_export_need_neither_torch_nor_transformers(tmp_path):
    """The interop path runs with torch, transformers and safetensors unimportable."""
    import subprocess
    import sys
    d = saved(llama_model(), tmp_path, "l")
    code = ("import sys\n"
            "for name in ('torch', 'transformers', 'safetensors'): sys.modules[name] = None\n"
            "from llm_jax import hf\n"
            f"cfg, params = hf.load_pretrained({d!r})\n"
            f"print(hf.save_pretrained({str(tmp_path / 'out')!r}, cfg, params))\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("llama")
    assert rel_err(reload_logits(str(tmp_path / "out"), transformers.AutoModelForCausalLM, TOKENS),
                   torch_logits(llama_model(), TOKENS)) < RTOL


def test_init_from_names_a_missing_hf_directory(tmp_path):
    assert hf.init_dir("runs/demo/sft") is None and hf.init_dir("") is None
    assert hf.init_dir(f"hf:{tmp_path}") == str(tmp_path)
    # It was reported as "no tokenizer.json" inside the missing directory.
    with pytest.raises(ConfigError, match=r"init_from=hf:.*nope'? is not a directory"):
        hf.init_dir(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        hf.init_dir(f"hf:{tmp_path / 'file'}")
