"""Plan a big run without big hardware: per-device memory for a target mesh.

    python -m llm_jax.plan --preset llama7b --mesh 1,64,4 --batch-size 256 --seq-len 4096 \\
        --dtype bfloat16 --remat full --memory-gib 95

builds the train state abstractly (`jax.eval_shape`: nothing is allocated),
shards it with the same partitioning table the trainer uses over an
`AbstractMesh` of the requested shape, and prints per-device bytes of params,
optimizer state and an activation estimate, and whether that fits the given
per-device memory. Params and optimizer bytes are exact (checked against real
host-device runs in tests); activations are an estimate (Korthikanti et al.
2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 1-2,
adapted for remat and the float32 logits).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import jax
import numpy as np
from jax.sharding import AbstractMesh

from llm_jax import model, sharding, train
from llm_jax.config import ConfigError, ModelConfig, OptimizerConfig, preset

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


def activation_bytes(cfg: ModelConfig, mesh, batch_size: int, seq_len: int) -> int:
    """Estimated activation memory per device for one forward+backward.

    Per layer, 16-bit, tensor parallelism t without sequence parallelism
    (Korthikanti et al. eq. 2): s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes; scaled by
    2 for float32 compute. With remat "full" only each layer's input (s*b*h) is
    kept, plus one layer's full activations during its recomputation; "dots"
    keeps the matmul outputs (roughly half). The float32 logits and their
    gradient add 2 * 4 * b*s*V / t."""
    b = batch_size / (mesh.shape["data"] * mesh.shape["fsdp"])
    s, h, a, t = seq_len, cfg.d_model, cfg.num_heads, mesh.shape["tensor"]
    width = 2 * (4 if cfg.dtype == "float32" else 2) / 4  # 1.0 for 16-bit, 2.0 for f32
    per_layer = s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) * width
    ffn_ratio = cfg.d_ff / (4 * h) * (1.5 if cfg.mlp == "swiglu" else 1.0)
    per_layer *= (10 + 24 / t * ffn_ratio) / (10 + 24 / t)  # wider MLPs keep more
    if cfg.remat == "full":
        kept = cfg.num_layers * s * b * h * (2 * width) + per_layer
    elif cfg.remat == "dots":
        kept = cfg.num_layers * per_layer * 0.5 + per_layer
    else:
        kept = cfg.num_layers * per_layer
    logits = 2 * 4 * b * s * cfg.vocab_size / t
    return int(kept + logits)


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
    try:
        sizes = [int(x) for x in args.mesh.split(",")]
        if len(sizes) != 3 or min(sizes) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --mesh {args.mesh!r}: expected three positive sizes data,fsdp,tensor", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("dtype", args.dtype), ("remat", args.remat)) if v}
    try:
        cfg = preset(args.preset, **overrides)
        result = plan(cfg, abstract_mesh(*sizes), args.batch_size, args.seq_len)
    except (ConfigError, sharding.MeshError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    sys.exit(main())
