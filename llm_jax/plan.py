"""Plan a big run without big hardware: per-device memory for a target mesh.

    python -m llm_jax.plan --preset llama7b --mesh 1,64,4 --batch-size 256 --seq-len 4096 \\
        --dtype bfloat16 --remat full --memory-gib 95

builds the train state abstractly (`jax.eval_shape`: nothing is allocated),
shards it with the same partitioning table the trainer uses over an
`AbstractMesh` of the requested shape, and prints per-device bytes of params,
optimizer state and an activation estimate, and whether that fits the given
per-device memory. Params and optimizer bytes are exact (checked against real
host-device runs in tests); activations are an estimate of what XLA keeps at the
peak of the backward (`activation_terms`: the residuals the layer scan saves, the
float32 logits, the all-gathered output matrix and its gradient, one layer's
recomputation), on the shape of Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 1-2) with coefficients measured
with the TPU compiler. benchmarks/PLAN_VS_COMPILER.md compares the total with the
compiler's per-chip bytes: within 20% on all 14 rows there (GPT-2, Llama-3.2-1B,
Llama-3-8B's layer at 4 layers; remat none/dots/full; fsdp, data x fsdp, fsdp x
tensor; 1024 and 4096 tokens; pretrain and sft), between -19% (GPT-2, remat full,
fsdp 4: XLA keeps more than the estimate's copies of its small output matrix while
memory is plentiful) and +13%. Before these terms the estimate was off by up to
+193% (remat dots at 4096 tokens: the [T, T] scores the splash kernel never stores).

For the compiler's own bytes, with libtpu installed, `python -m llm_jax.aot
--stage pretrain --topology v5p:2x2x1 ...` compiles the same step for a TPU
slice and prints them beside this estimate (aot builds on this module, so the
planner itself never compiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import jax
import numpy as np
from jax.sharding import AbstractMesh

from llm_jax import cli, model, sharding, train
from llm_jax.config import ModelConfig, OptimizerConfig, preset
from llm_jax.errors import ConfigError

GiB = 1024 ** 3


def abstract_mesh(data: int, fsdp: int, tensor: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tensor), sharding.AXES)


def sharded_bytes(tree, mesh) -> int:
    """Bytes on the most-loaded device of `tree` (ShapeDtypeStructs) under the table."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        spec = sharding.spec_for(path, leaf.shape, mesh)
        local = [math.ceil(d / (mesh.shape[ax] if ax else 1)) for d, ax in
                 zip(leaf.shape, tuple(spec) + (None,) * (len(leaf.shape) - len(spec)))]
        total += int(np.prod(local, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


# Bytes XLA keeps per token per layer for the backward pass, in units of d_model
# compute-dtype values, on Korthikanti et al.'s shape (10 + 24/t x the MLP's width,
# eq. 1-2): measured with the TPU compiler on GPT-2 and Llama-3.2-1B at 1024 tokens
# (benchmarks/PLAN_VS_COMPILER.md), then checked on the other rows. remat none keeps
# ~3.3x the paper's 16-bit count: XLA keeps float32 copies where the model computes
# in float32 (norms, rotary, the splash kernel's statistics); dots keeps the matmul
# outputs and what the elementwise ops between them need.
# Fitted on GPT-2-124M and Llama-3.2-1B (benchmarks/PLAN_VS_COMPILER.md, all rows
# within 20%). A small model (4 layers, d=512) without remat keeps less than 3.3x:
# the planner then over-estimates it by 21-44% (tests/test_plan.py); compile it with llm_jax.aot.
KEPT_PER_LAYER = {"none": 3.3, "dots": 1.3}


def attention_fused(cfg: ModelConfig, seq_len: int) -> bool:
    """Whether attention runs in a kernel that never stores the [T, T] scores: the
    splash kernel ("auto" on TPU, or "splash") or cuDNN, both for T a multiple of 128."""
    return cfg.attention_impl != "xla" and seq_len % 128 == 0


def activation_terms(cfg: ModelConfig, mesh, batch_size: int, seq_len: int) -> dict[str, int]:
    """Per-device bytes beside params, optimizer state and gradients at the peak of
    one forward+backward, by what XLA keeps (checked against the TPU compiler's
    memory analysis in benchmarks/PLAN_VS_COMPILER.md):

      saved   per layer, what the scan keeps from the forward for the backward:
              remat "full" the layer's input only (the residual stream, s*b*h);
              "dots"/"none" KEPT_PER_LAYER x Korthikanti's s*b*h*(10 + 24/t*width),
              + the [T, T] attention scores (5*a*s/(h*t)) when attention is not fused.
      peak    the larger of the two phases of the backward (they do not overlap):
              head:  the float32 logits [b, s, V/t] (their gradient overwrites them)
                     + two compute-dtype copies of the (all-gathered) output matrix
                     [V/t, h] + its float32 gradient before the reduce-scatter
                     (+ the input table's float32 gradient when untied);
              layer: one layer's recomputed matmul outputs (with remat) + its
                     all-gathered compute-dtype weights + their float32 gradient.
    """
    b = batch_size / (mesh.shape["data"] * mesh.shape["fsdp"])
    s, h, a, t = seq_len, cfg.d_model, cfg.num_heads, mesh.shape["tensor"]
    c = np.dtype(cfg.dtype).itemsize  # compute dtype bytes
    width = cfg.d_ff / (4 * h) * (1.5 if cfg.mlp == "swiglu" else 1.0)  # Korthikanti's MLP is 4h, 2 matmuls
    korthikanti = s * b * h * (10 + 24 / t * width) * c / 2  # their 16-bit count, per layer
    scores = 0.0 if attention_fused(cfg, s) else s * b * h * 5 * a * s / (h * t) * c / 2
    if cfg.remat == "full":
        saved = s * b * h * c
    else:
        saved = KEPT_PER_LAYER[cfg.remat] * korthikanti + scores
    # Two compute-dtype copies of the output matrix: the layout of the forward
    # (h @ W^T) and the transposed one of the backward (dlogits @ W); XLA's buffer
    # report of a small model shows both live at the peak.
    head = b * s * cfg.vocab_size / t * 4 + cfg.vocab_size * h / t * (2 * c + 4)
    if not cfg.tie_embeddings:
        # The input table's float32 gradient (the lookup's scatter-add into the whole
        # gathered [V, h] table) is live beside the head's: measured on Llama-3-8B.
        head += cfg.vocab_size * h / t * 4
    qkvo = h * (2 * a + 2 * cfg.kv_heads) * cfg.head_size
    mlp = h * cfg.d_ff * (3 if cfg.mlp == "swiglu" else 2)
    # Recomputing a layer brings back its matmul outputs (what "dots" saves); without
    # remat nothing is recomputed.
    recomputed = KEPT_PER_LAYER["dots"] * korthikanti + scores if cfg.remat != "none" else 0
    layer = recomputed + (qkvo + mlp) / t * (c + 4)
    return {"saved": int(cfg.num_layers * saved), "peak": int(max(head, layer))}


def activation_bytes(cfg: ModelConfig, mesh, batch_size: int, seq_len: int) -> int:
    """Estimated activation memory per device for one forward+backward (see
    `activation_terms`)."""
    return sum(activation_terms(cfg, mesh, batch_size, seq_len).values())


@dataclasses.dataclass(frozen=True)
class Plan:
    params: int
    optimizer: int
    gradients: int  # one params-shaped buffer, alive during the update
    activations: int
    param_count: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations


def plan(cfg: ModelConfig, mesh, batch_size: int, seq_len: int,
         optim: OptimizerConfig = OptimizerConfig()) -> Plan:
    sharding.check_model_fits_mesh(cfg, mesh)
    sharding.check_batch_fits_mesh(batch_size, 1, mesh)
    tx, _ = train.make_optimizer(optim, 1000)
    params = jax.eval_shape(lambda r: model.init(cfg, r), jax.random.PRNGKey(0))
    opt_state = jax.eval_shape(tx.init, params)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    param_bytes = sharded_bytes(params, mesh)
    return Plan(params=param_bytes, optimizer=sharded_bytes(opt_state, mesh), gradients=param_bytes,
                activations=activation_bytes(cfg, mesh, batch_size, seq_len), param_count=count)


def _parse_mesh(text: str) -> list[int]:
    """--mesh "1,64,4" -> [1, 64, 4]."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:  # int("x"): reported below with the rest
        sizes = []
    if len(sizes) != 3 or min(sizes) < 1:
        raise ConfigError(f"--mesh {text!r}: expected three positive sizes data,fsdp,tensor, e.g. 1,8,1")
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Per-device memory of a train state on a target mesh.")
    p.add_argument("--preset", default="llama", help="model preset (tiny, gpt2, llama, llama7b, bert)")
    p.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor sizes, e.g. 1,64,4")
    p.add_argument("--batch-size", type=int, default=64, help="global batch in sequences")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dtype", default=None, help="compute dtype (default: the preset's)")
    p.add_argument("--remat", default=None, choices=["none", "full", "dots"])
    p.add_argument("--memory-gib", type=float, default=None, help="per-device memory to check against")
    args = p.parse_args(argv)
    sizes = _parse_mesh(args.mesh)
    overrides = {k: v for k, v in (("dtype", args.dtype), ("remat", args.remat)) if v}
    cfg = preset(args.preset, **overrides)
    result = plan(cfg, abstract_mesh(*sizes), args.batch_size, args.seq_len)
    n = int(np.prod(sizes))
    print(f"{args.preset}: {result.param_count / 1e9:.3f}B params; mesh data={sizes[0]} fsdp={sizes[1]} "
          f"tensor={sizes[2]} ({n} devices); batch {args.batch_size} x {args.seq_len}; "
          f"compute {cfg.dtype}, remat {cfg.remat}")
    print(f"  per device: params {result.params / GiB:8.2f} GiB")
    print(f"              optimizer {result.optimizer / GiB:5.2f} GiB  (AdamW: 2 moments)")
    print(f"              gradients {result.gradients / GiB:5.2f} GiB")
    print(f"              activations ~{result.activations / GiB:4.2f} GiB  (estimate)")
    print(f"              total ~{result.total / GiB:8.2f} GiB")
    if args.memory_gib:
        fits = result.total <= args.memory_gib * GiB
        print(f"  {'fits' if fits else 'does NOT fit'} in {args.memory_gib:g} GiB per device"
              + ("" if fits else "; try more fsdp, --remat full, or a smaller batch"))
        return 0 if fits else 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
