"""Frozen, typed configs and `--set key=value` overrides.

Every config is a frozen dataclass passed explicitly; an experiment derives its
own from these with `dataclasses.replace` (never a global, never YAML layers).
`apply_overrides(cfg, ["model.num_layers=4", "optim.lr=1e-3"])` walks dotted
paths through nested dataclasses and parses each value by the field's type, so
a typo or a bad value fails at start-up with the key's name, not mid-run.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from typing import Any

from llm_jax.errors import ConfigError  # noqa: F401 - raised here, imported from here by callers


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One transformer: decoder (causal LM) or encoder (bidirectional, MLM)."""

    vocab_size: int = 256
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: = num_heads (MHA); fewer: grouped-query attention
    head_dim: int | None = None  # None: d_model // num_heads
    d_ff: int = 256
    max_len: int = 128  # longest sequence (learned positions, KV cache default)
    causal: bool = True  # False: encoder (bidirectional attention)
    positions: str = "rotary"  # "learned" | "sinusoidal" | "rotary"
    rope_theta: float = 10_000.0
    # "llama3": Llama 3.1+'s rescaled rotary frequencies (wavelengths beyond
    # rope_original_max_len / rope_low_freq_factor slowed by rope_factor, a smooth
    # blend up to rope_original_max_len / rope_high_freq_factor); "none": plain RoPE.
    rope_scaling: str = "none"  # "none" | "llama3"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm: str = "rmsnorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    # "pre": x + f(norm(x)), one final norm (GPT-2, Llama); "post": norm(x + f(x)),
    # a norm on the embeddings and none at the end (BERT).
    norm_position: str = "pre"  # "pre" | "post"
    mlp: str = "swiglu"  # "gelu" (tanh form, GPT-2) | "gelu_exact" (erf form, BERT) | "swiglu"
    use_bias: bool = False  # biases in attention and MLP projections (GPT-2, BERT)
    type_vocab_size: int = 0  # > 0: token-type (segment A/B) embeddings, added to the input (BERT)
    # BERT's masked-LM head: dense D->D + GELU + LayerNorm before the (tied) output
    # matrix, and a bias on the vocabulary logits.
    lm_head_transform: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0  # on embeddings and each residual branch (train only)
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype (e.g. "bfloat16")
    param_dtype: str = "float32"  # storage dtype of the weights
    remat: str = "none"  # "none" | "full" | "dots" (save only matmul outputs)
    scan_layers: bool = True  # lax.scan over layers: compile time flat in depth
    attention_impl: str = "auto"  # "auto" | "xla" | "cudnn" | "splash" (TPU kernel; see model.attention)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def validate(self) -> "ModelConfig":
        choices = {
            "positions": ("learned", "sinusoidal", "rotary"),
            "rope_scaling": ("none", "llama3"),
            "norm": ("layernorm", "rmsnorm"),
            "norm_position": ("pre", "post"),
            "mlp": ("gelu", "gelu_exact", "swiglu"),
            "remat": ("none", "full", "dots"),
            "attention_impl": ("auto", "xla", "cudnn", "splash"),
            "dtype": ("float32", "bfloat16", "float16"),
            "param_dtype": ("float32", "bfloat16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: expected one of {allowed}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be positive")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; "
                "set model.head_dim explicitly")
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} is not a multiple of model.num_kv_heads={self.kv_heads}")
        if self.positions == "rotary" and self.head_size % 2:
            raise ConfigError(f"rotary positions need an even head size, got {self.head_size}")
        if self.positions == "sinusoidal" and self.d_model % 2:
            raise ConfigError(f"sinusoidal positions need an even model.d_model, got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.type_vocab_size < 0:
            raise ConfigError(f"model.type_vocab_size={self.type_vocab_size} must be >= 0")
        if self.rope_scaling == "llama3" and not (
                self.rope_factor > 0 and 0 < self.rope_low_freq_factor < self.rope_high_freq_factor
                and self.rope_original_max_len > 0):
            raise ConfigError(
                f"model.rope_scaling='llama3' needs rope_factor > 0, 0 < rope_low_freq_factor < "
                f"rope_high_freq_factor and rope_original_max_len > 0; got {self.rope_factor}, "
                f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}, {self.rope_original_max_len}")
        return self


# Presets with the shapes of real model families. `tiny` is the one model every
# test uses; change it here and the whole suite follows.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        d_ff=128, max_len=64),
    # GPT-2 small (124M): learned positions, LayerNorm, GELU, biases, tied embeddings.
    "gpt2": ModelConfig(vocab_size=50257, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
                        max_len=1024, positions="learned", norm="layernorm", norm_eps=1e-5,
                        mlp="gelu", use_bias=True, tie_embeddings=True),
    # Llama-3.2-1B: RoPE with Llama-3 scaling, RMSNorm, SwiGLU, GQA 32/8, tied embeddings (~1.24B).
    "llama": ModelConfig(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32,
                         num_kv_heads=8, d_ff=8192, max_len=8192, positions="rotary",
                         rope_theta=500_000.0, rope_scaling="llama3", rope_factor=32.0,
                         rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                         rope_original_max_len=8192, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                         use_bias=False, tie_embeddings=True),
    # Llama-3-8B: GQA 32/8, vocab 128256, untied head, rope_theta 500k (Llama 3.0: no
    # rope scaling; 3.1's long-context scaling is `rope_scaling="llama3"`).
    "llama3_8b": ModelConfig(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32,
                             num_kv_heads=8, d_ff=14336, max_len=8192, positions="rotary",
                             rope_theta=500_000.0, norm="rmsnorm", norm_eps=1e-5, mlp="swiglu",
                             use_bias=False, tie_embeddings=False),
    # GPT-2 medium (355M): the GPT-2 family at 24 layers x 1024.
    "gpt2_medium": ModelConfig(vocab_size=50257, d_model=1024, num_layers=24, num_heads=16, d_ff=4096,
                               max_len=1024, positions="learned", norm="layernorm", norm_eps=1e-5,
                               mlp="gelu", use_bias=True, tie_embeddings=True),
    # Llama-2-7B shape, for memory planning.
    "llama7b": ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                           d_ff=11008, max_len=4096, positions="rotary", norm="rmsnorm",
                           mlp="swiglu", use_bias=False, tie_embeddings=False),
    # BERT-base (110M): encoder, post-norm, learned positions, token types, erf GELU,
    # biases, the masked-LM head transform; loads bert-base-uncased (`llm_jax.hf`).
    "bert": ModelConfig(vocab_size=30522, d_model=768, num_layers=12, num_heads=12, d_ff=3072,
                        max_len=512, causal=False, positions="learned", norm="layernorm",
                        norm_eps=1e-12, norm_position="post", mlp="gelu_exact", use_bias=True,
                        type_vocab_size=2, lm_head_transform=True, lm_head_bias=True,
                        tie_embeddings=True),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay, and global-norm clipping."""

    lr: float = 3e-4
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: the run's total steps
    end_lr_ratio: float = 0.1  # final lr = lr * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0

    def validate(self, where: str = "optim") -> "OptimizerConfig":
        _check(where, self, positive=("lr", "eps"), non_negative=("warmup_steps", "weight_decay"),
               unit=("b1", "b2", "end_lr_ratio"))
        if self.decay_steps is not None:
            _check(where, self, positive=("decay_steps",))
        if self.clip_norm is not None:
            _check(where, self, positive=("clip_norm",))
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape. -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def validate(self, where: str = "mesh") -> "MeshConfig":
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        if any(v == 0 or v < -1 for v in sizes.values()) or list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"{where} {sizes}: each size must be positive, or -1 on at most one axis "
                              "(it takes the devices the others leave)")
        return self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    seq_len: int = 128
    microbatches: int = 1  # gradient accumulation: batch_size // microbatches per pass
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # >0: held-out evaluation every N steps, logged as eval_* (stages that have one); 0: at the end only
    stop_after: int = 0  # >0: this invocation stops (and saves) at that step; rerun to continue
    checkpoint_every: int = 100  # async saves; the last step is always saved
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    # Loss-spike guard (as PaLM's training did: restart from a checkpoint before the spike
    # and skip the batches around it; Chowdhery et al. 2022, "PaLM: Scaling Language
    # Modeling with Pathways", arXiv:2204.02311): a non-finite loss, or one above
    # spike_factor x the median of the last spike_window losses and at least
    # spike_min_increase nats above it, rolls back to the last checkpoint and skips the
    # batches since; more than max_rollbacks within rollback_window steps stops the run.
    # The absolute floor matters late in fine-tuning: at a median of 0.08 nats an ordinary
    # harder batch (0.19) is 2.5x the median, and the ratio alone stopped a healthy SFT
    # run.
    spike_factor: float = 2.5  # 0 disables the median rule (non-finite losses still roll back)
    spike_min_increase: float = 0.5
    spike_window: int = 50
    max_rollbacks: int = 3
    rollback_window: int = 1000

    def validate(self, where: str = "train") -> "TrainConfig":
        _check(where, self, positive=("steps", "batch_size", "seq_len", "microbatches", "log_every",
                                      "checkpoint_every", "keep_checkpoints", "spike_window",
                                      "rollback_window"),
               non_negative=("eval_every", "stop_after", "spike_factor", "spike_min_increase",
                             "max_rollbacks"))
        if self.batch_size % self.microbatches:
            raise ConfigError(f"{where}.batch_size={self.batch_size} is not divisible by "
                              f"{where}.microbatches={self.microbatches}")
        return self


def _check(where: str, cfg: Any, positive=(), non_negative=(), unit=()) -> None:
    """Raises ConfigError naming the first field that is not a finite number in its
    range: > 0 (`positive`), >= 0 (`non_negative`), in [0, 1] (`unit`)."""
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                            (unit, lambda v: 0 <= v <= 1, "in [0, 1]")):
        for name in names:
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ConfigError(f"{where}.{name}={v!r}: must be a finite number {what}")


def validate_all(cfg: Any, where: str = "") -> Any:
    """Validates `cfg` and every config nested in it (each class's own `validate`),
    so a value that cannot work stops before any work, with its dotted name."""
    for field in dataclasses.fields(cfg):
        child = getattr(cfg, field.name)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            validate_all(child, f"{where}.{field.name}" if where else field.name)
    check = getattr(cfg, "validate", None)
    if callable(check) and where:
        params = inspect.signature(check).parameters
        check(where=where) if "where" in params else check()
    return cfg


# ---------------------------------------------------------------------------
# --set key=value overrides


def _parse(value: str, typ: Any, key: str) -> Any:
    """Parses one override string into the field's declared type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        return _parse(value, args[0], key)
    if typ is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {key}={value!r}: not a valid bool; use true or false (or 1/0, yes/no, on/off)")
    try:
        if typ is int:
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return value
        if origin in (tuple, list) or typ in (tuple, list):
            parsed = json.loads(value)
            return tuple(parsed) if (origin or typ) is tuple else list(parsed)
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"--set {key}={value!r}: not a valid {getattr(typ, '__name__', typ)}") from e
    raise ConfigError(f"--set {key}: fields of type {typ} cannot be set from the command line")


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Returns `cfg` with each "a.b.c=value" applied, parsed by the field's type."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        cfg = _replace_path(cfg, key.strip().split("."), value.strip(), key)
    return cfg


def _replace_path(cfg: Any, path: list[str], value: str, key: str) -> Any:
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"--set {key}: {path[0]!r} is not a config section")
    hints = typing.get_type_hints(type(cfg))
    name = path[0]
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(f"--set {key}: no field {name!r} in {type(cfg).__name__} (fields: {known})")
    if len(path) == 1:
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if name == "model" and value in PRESETS:  # --set model=gpt2 picks a preset
                return dataclasses.replace(cfg, model=PRESETS[value])
            raise ConfigError(f"--set {key}: is a section; set one of its fields ({key}.FIELD=...)")
        return dataclasses.replace(cfg, **{name: _parse(value, hints[name], key)})
    child = _replace_path(getattr(cfg, name), path[1:], value, key)
    return dataclasses.replace(cfg, **{name: child})


def to_dict(cfg: Any) -> dict:
    """JSON-ready dict of a (nested) config, for run.json / config.json."""
    return dataclasses.asdict(cfg)
