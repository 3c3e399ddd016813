"""Llama-style SFT then DPO on your own JSONL files.

    python -m experiments.llama_sft_dpo --workdir runs/llama \\
        --set sft.data.source=jsonl:data/sft.jsonl --set dpo.data.source=jsonl:data/prefs.jsonl \\
        [--set init_from=runs/base/pretrain | --set init_from=hf:path/to/Llama-3.2-1B] \\
        [--set sft_eval=jsonl:data/sft_eval.jsonl] [--set dpo_eval=jsonl:data/prefs_eval.jsonl] \\
        [--set export_dir=out/hf_model] [--set model.dtype=bfloat16 ...]

Records: SFT lines `{"prompt", "response"}`, preference lines `{"prompt",
"chosen", "rejected"}`; a bad line is skipped and counted with its line number.
The model is `preset("llama")` (a Llama-3.2-1B shape: RoPE, RMSNorm, SwiGLU,
grouped-query attention) unless overridden. `init_from` names a stage directory
of an earlier llm_jax run (its `checkpoints/` and the run's `tokenizer/` are
used), or `hf:DIR` a local Hugging Face directory (config.json, safetensors and
tokenizer.json; Llama, Mistral or GPT-2): the architecture then comes from
DIR/config.json, only how to compute (model.dtype, param_dtype, remat,
scan_layers, attention_impl, dropout) from this config (any other model.* set
to a value the checkpoint does not have is an error), and the vocabulary
grows by the SFT template's <prompt>/<response> tokens when the tokenizer lacks
them. Without init_from the model starts from random weights and a byte-level
BPE is trained on the JSONL texts - fine for a smoke test, not for real use.
`export_dir` writes the final DPO policy (LoRA merged) as a Hugging Face
directory with the tokenizer, loadable by `transformers`.

Stages: `sft` (completion-only loss, optional KL to the initial model), then
`dpo` from the SFT weights with the SFT model as reference (its log-probs are
computed once, stored under dpo/reference/, and it leaves memory before the
policy trains). Evaluation: held-out response loss for SFT (`sft_eval`),
held-out preference accuracy of DPO's implicit reward (`dpo_eval`). Rerun to
resume.

LoRA (`--set lora.rank=8 --set lora.targets='["q","v"]'`, see llm_jax/lora.py):
both stages train only low-rank adapters on a frozen base. SFT adapts the
initial weights; DPO starts from the merged SFT weights with fresh adapters,
and those merged weights are also its frozen reference (one copy). Each
stage's checkpoints then hold only its adapters and their optimizer state, and
eval.json records the adapter count next to the model's.

On a GPU/TPU host (one process per host; see docs/tpu.md for pods), with a
local or mounted run directory (the reference cache is plain files):
    python -m experiments.llama_sft_dpo --workdir /data/runs/llama \\
        --set model.dtype=bfloat16 --set mesh.fsdp=-1 --set mesh.data=1 \\
        --set sft.train.batch_size=64 --set sft.train.seq_len=2048 ...
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp

from llm_jax import checkpoint, cli, hf, launch, lora, model, sharding
from llm_jax.config import MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, preset
from llm_jax.data.loader import DataConfig
from llm_jax.data.records import check_record
from llm_jax.data.sources import open_source
from llm_jax.data.tokenizer import check_vocab_fits, load_hf_tokenizer, load_tokenizer, train_bpe
from llm_jax.errors import ConfigError, TokenizerError
from llm_jax.rundir import is_primary, parse_args, say, write_run_json
from llm_jax.stages import dpo, runner, sft


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = preset("llama")
    mesh: MeshConfig = MeshConfig()
    init_from: str = ""  # a stage directory of an earlier run, e.g. runs/base/pretrain
    tokenizer_sample: int = 20_000  # records to train a BPE on when there is no init_from
    sft: sft.SFTConfig = sft.SFTConfig(
        optim=OptimizerConfig(lr=2e-5, warmup_steps=100, weight_decay=0.0),
        train=TrainConfig(steps=2000, batch_size=64, seq_len=1024, log_every=20, checkpoint_every=500),
        data=DataConfig(source="jsonl:sft.jsonl", max_segments=32))
    dpo: dpo.DPOConfig = dpo.DPOConfig(
        optim=OptimizerConfig(lr=5e-7, warmup_steps=50, weight_decay=0.0),
        train=TrainConfig(steps=1000, batch_size=64, seq_len=1024, log_every=20, checkpoint_every=500,
                          seed=1, spike_factor=0.0),
        data=DataConfig(source="jsonl:prefs.jsonl", max_segments=32))
    sft_eval: str = ""  # jsonl:PATH of held-out SFT records (response loss before/after)
    dpo_eval: str = ""  # jsonl:PATH of held-out preference pairs (implicit-reward accuracy)
    eval_batches: int = 16
    lora: lora.LoRAConfig = lora.LoRAConfig()  # rank > 0: SFT and DPO train adapters only
    export_dir: str = ""  # a Hugging Face directory for the final DPO policy


def hf_source(cfg: Config) -> str | None:
    """DIR of init_from=hf:DIR, else None."""
    return hf.init_dir(cfg.init_from)


def with_hf_model(cfg: Config, tok) -> Config:
    """cfg whose model is the HF checkpoint's architecture with this config's runtime
    fields (`hf.RUNTIME_FIELDS`), its vocabulary grown to the tokenizer's (the template
    markers); a model.* field set to a value the checkpoint does not have is a
    ConfigError (`hf.init_config`)."""
    return dataclasses.replace(cfg, model=hf.init_config(hf_source(cfg), cfg.model, Config().model,
                                                         tok.vocab_size))


def record_texts(source: str, kind: str, data: DataConfig, count: int) -> list[str]:
    """Prompt and response texts of up to `count` records (for training a tokenizer)."""
    src = open_source(source, kind=kind, seed=data.seed, cache_dir=data.cache_dir)
    fields = ("prompt", "response") if kind == "sft" else ("prompt", "chosen", "rejected")
    texts = []
    for i in range(min(count, len(src.records))):
        rec = check_record(src.records[i], kind)
        if isinstance(rec, dict):
            texts.extend(rec[f] for f in fields)
    return texts


def run_tokenizer(workdir: str, cfg: Config):
    """This run's saved tokenizer, the HF checkpoint's, the init run's, or a BPE
    trained on the JSONL texts."""
    if hf_source(cfg):
        saved = os.path.join(workdir, "tokenizer")
        if os.path.exists(os.path.join(saved, "meta.json")):
            return load_tokenizer(saved)
        return load_hf_tokenizer(hf_source(cfg))
    for directory in ([os.path.join(os.path.dirname(os.path.abspath(cfg.init_from)), "tokenizer")]
                      if cfg.init_from else []) + [os.path.join(workdir, "tokenizer")]:
        if os.path.exists(os.path.join(directory, "meta.json")):
            return load_tokenizer(directory)
    if cfg.init_from:
        raise ConfigError(f"init_from={cfg.init_from}: no tokenizer/ beside it; was it made by llm_jax?")
    texts = (record_texts(cfg.sft.data.source, "sft", cfg.sft.data, cfg.tokenizer_sample)
             + record_texts(cfg.dpo.data.source, "preferences", cfg.dpo.data, cfg.tokenizer_sample))
    say(f"tokenizer: training a {cfg.model.vocab_size}-token BPE on {len(texts)} texts of the JSONL files")
    return train_bpe(texts, cfg.model.vocab_size)


def sft_init(cfg: Config, like, mesh):
    """The weights SFT starts from: `init_from`'s, or random ones (the same for the
    same seed, so a LoRA SFT's base can be rebuilt for the hand-off to DPO)."""
    if hf_source(cfg):
        return jax.device_put(hf.init_params(hf_source(cfg), cfg.model), jax.tree.map(lambda x: x.sharding, like))
    if cfg.init_from:
        return checkpoint.load_params(os.path.join(cfg.init_from, "checkpoints"), like)
    return jax.jit(lambda r: model.init(cfg.model, r), out_shardings=jax.tree.map(
        lambda x: x.sharding, like))(jax.random.PRNGKey(cfg.sft.train.seed))


def sft_final(workdir: str, cfg: Config, like, mesh):
    """The SFT model's full weights: its checkpoint, or with LoRA its adapters merged
    into the weights SFT started from."""
    if not cfg.lora.enabled:
        return runner.stage_params(workdir, "sft", like)
    return lora.load_merged(os.path.join(workdir, "sft", "checkpoints"), sft_init(cfg, like, mesh), cfg.lora,
                            cfg.model, mesh)


def dpo_final(workdir: str, cfg: Config, like, mesh):
    """The DPO policy's full weights (LoRA: its adapters merged into the SFT model)."""
    if not cfg.lora.enabled:
        return runner.stage_params(workdir, "dpo", like)
    return lora.load_merged(os.path.join(workdir, "dpo", "checkpoints"), sft_final(workdir, cfg, like, mesh),
                            cfg.lora, cfg.model, mesh)


def heldout_loader(data: DataConfig, tr: TrainConfig, tok, source: str, kind: str):
    """One unshuffled pass over a held-out JSONL file, in the stage's rows."""
    return runner.stage_loader(data, tr, tok, source=source, shuffle=False, num_epochs=1, kind=kind)


def sft_heldout_loss(cfg: Config, tok, mesh, when: str):
    """params -> {"heldout_response_loss_<when>": mean response-token loss on sft_eval (None without)}."""
    fn = jax.jit(lambda p, b: sft.eval_loss(cfg.model, p, b))

    def loss(params) -> dict:
        value = None
        if cfg.sft_eval:
            sums = runner.heldout_sums(fn, params, heldout_loader(cfg.sft.data, cfg.sft.train, tok, cfg.sft_eval,
                                                                   "sft"), cfg.eval_batches, mesh)
            value = float(sums[0] / max(sums[1], 1.0))
        return {f"heldout_response_loss_{when}": value}
    return loss


def dpo_heldout_accuracy(cfg: Config, policy, reference, tok, mesh) -> float | None:
    """Fraction of held-out pairs where the implicit reward beta*(log pi - log pi_ref)
    ranks chosen over rejected, ties counting half (so the SFT model itself, whose
    implicit reward is 0 everywhere, scores 0.5)."""
    if not cfg.dpo_eval:
        return None
    S = cfg.dpo.data.max_segments

    def margins(p, b):
        return dpo.pair_logps(cfg.model, p, b, "chosen_", S) - dpo.pair_logps(cfg.model, p, b, "rejected_", S)

    def counts(pol, b, ref):
        h = margins(pol, b) - margins(ref, b)
        won = jnp.where(h > 0, 1.0, jnp.where(h == 0, 0.5, 0.0))
        return jnp.sum(won * b["pair_mask"]), jnp.sum(b["pair_mask"])

    fn = jax.jit(counts)
    loader = heldout_loader(cfg.dpo.data, cfg.dpo.train, tok, cfg.dpo_eval, "preferences")
    correct, total = runner.heldout_sums(lambda p, b: fn(p, b, reference), policy, loader, cfg.eval_batches, mesh)
    return float(correct / max(total, 1.0))


def stages(workdir: str, cfg: Config, mesh, tok) -> list[runner.Stage]:
    """sft from init_from (or random weights), then dpo from the SFT model."""
    like = runner.model_like(cfg.model, mesh)

    def dpo_after(policy) -> dict:
        after = None
        if cfg.dpo_eval:  # the reference is reloaded: without LoRA it left memory while the policy trained
            after = dpo_heldout_accuracy(cfg, policy, sft_final(workdir, cfg, like, mesh), tok, mesh)
        return {"heldout_pair_accuracy_after": after}

    return [
        sft.stage(cfg.model, cfg.sft, tok, init=lambda: sft_init(cfg, like, mesh), lora=cfg.lora,
                  before=sft_heldout_loss(cfg, tok, mesh, "before"), after=sft_heldout_loss(cfg, tok, mesh, "after")),
        dpo.stage(cfg.model, cfg.dpo, tok, mesh, init=lambda: sft_final(workdir, cfg, like, mesh), lora=cfg.lora,
                  reference_name=f"{workdir}/sft",
                  before=lambda ref: {"heldout_pair_accuracy_before": dpo_heldout_accuracy(cfg, ref, ref, tok, mesh)},
                  after=dpo_after),
    ]


def main(argv=None) -> int:
    workdir, cfg = parse_args(__doc__.splitlines()[0], Config(), argv)
    launch.initialize()
    tok = None
    if hf_source(cfg):  # the architecture is the checkpoint's, known before any check
        tok = run_tokenizer(workdir, cfg)
        cfg = with_hf_model(cfg, tok)
    cfg.model.validate()
    cfg.lora.validate(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_model_fits_mesh(cfg.model, mesh)
    # Both stages' settings and records (and held-out files), before SFT trains (not DPO's after it).
    for name, kind, heldout in (("sft", "sft", cfg.sft_eval), ("dpo", "preferences", cfg.dpo_eval)):
        settings = getattr(cfg, name)
        runner.check(name, settings, cfg.model, mesh, kind=kind)
        if heldout:
            runner.check(name, dataclasses.replace(settings, data=dataclasses.replace(settings.data, source=heldout)),
                         cfg.model, mesh, kind=kind)
    cfg.dpo.validate()
    write_run_json(workdir, cfg, "llama_sft_dpo")
    try:
        tok = tok or run_tokenizer(workdir, cfg)
        check_vocab_fits(tok, cfg.model.vocab_size)
    except TokenizerError as e:
        raise ConfigError(str(e)) from None
    if is_primary():
        tok.save(os.path.join(workdir, "tokenizer"))
    if not cfg.init_from:
        say("init_from is empty: SFT starts from random weights (a smoke test, not real use)")
    results = {}
    for stage in stages(workdir, cfg, mesh, tok):
        results[stage.name] = runner.run(workdir, stage, mesh)
        if results[stage.name] is None:
            return 0
    s, d = results["sft"], results["dpo"]
    say(f"sft: held-out response loss {s['heldout_response_loss_before']} -> {s['heldout_response_loss_after']}")
    say(f"dpo: held-out implicit-reward accuracy {d['heldout_pair_accuracy_before']} -> "
        f"{d['heldout_pair_accuracy_after']}")
    if cfg.export_dir:
        policy = runner.host_params(dpo_final(workdir, cfg, runner.model_like(cfg.model, mesh), mesh))
        if is_primary():
            family = hf.save_pretrained(cfg.export_dir, cfg.model, policy, tokenizer=tok)
            say(f"export: the DPO policy as a Hugging Face {family} model in {cfg.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
