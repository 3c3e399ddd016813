"""Ahead-of-time compilation of a stage's step for a TPU slice, on a host without one.

    python -m llm_jax.aot --preset llama --stage pretrain --topology v5p:2x2x1 --mesh 1,4,1 \\
        --batch-size 16 --seq-len 2048 --set model.dtype=bfloat16 --set model.remat=full

compiles the stage's own jitted step (the one the experiments run) with the real
TPU compiler (libtpu, `pip install -e ".[tpu]"`) for the devices of a TPU
topology that is not attached, from abstract inputs (`jax.ShapeDtypeStruct`
with the partitioning table's shardings: nothing is allocated), and prints what
XLA itself says about one chip: the bytes of arguments, outputs and temporaries,
whether they fit in its HBM, the FLOPs and bytes it accesses, a roofline bound on
the step time and MFU, the compile time, and the planner's estimate
(`llm_jax.plan`) for the same settings. The last line is one JSON object (the
same dict `compile_stage` returns). Exit status: 0 fits, 1 does not fit (also
when the TPU compiler refuses the program for want of HBM), 2 settings that
cannot work (`error: ...` on stderr, before anything is compiled).

Stages (`STAGES`: adding one is one entry): pretrain, mlm, sft, sft_kl, rm, dpo,
ppo (the PPO update), generate (the KV-cache sampler), grpo (the GRPO update on
--batch-size prompts x grpo.group_size completions; its sampler is generate's
program on that many rows: `--stage generate --batch-size PROMPTS*G`). generate,
ppo and grpo split --seq-len into a prompt and `max_new_tokens` new tokens
(default: half each; the KV cache has seq_len slots). `--set` takes model.* (on
top of the preset), optim.*, lora.* (sft, sft_kl, rm, dpo), ppo.*, grpo.*,
mesh.* and the fields of `AOTSettings`; a wrong key fails with its name.

From Python: `compile_stage(AOTSettings(stage="sft", topology="v5p:2x2x1",
mesh=MeshConfig(1, 4, 1), batch_size=16, seq_len=2048, model=preset("llama3_8b"),
lora=LoRAConfig(rank=8, targets=("q", "v"))))` returns the dict the CLI prints
as JSON (keys: `compile_stage`'s docstring).

What the numbers are (checked on libtpu 0.0.42 / jax 0.10.2, see tests/test_aot.py):
  * `memory_analysis()` and `cost_analysis()` describe the program of ONE chip
    (SPMD: every chip runs the same partitioned program); doubling the chips of
    the same model and batch halves the FLOPs reported.
  * XLA's cost analysis counts the body of a while loop ONCE, not times its trip
    count: with `model.scan_layers` (the default) the layer loop is one while
    loop, so `flops_per_chip` and the bytes accessed cover one layer of L (and one
    microbatch, one PPO update, one decode step). Measured: a 4-layer model
    reports the same FLOPs as a 2-layer one when scanned, and 1.02 x 6*N*tokens
    / chips unrolled. So the step's matmul FLOPs are also counted from its jaxpr
    (`jaxpr_flops`: loops times their length, remat's recomputation included;
    within 1.5% of XLA's count on unrolled programs, which have no loop to
    miss), and the roofline takes the larger count (see `roofline`).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import jaxprs_in_params
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llm_jax import cli, generate, lora, model, plan, sharding, train
from llm_jax.config import PRESETS, ConfigError, MeshConfig, ModelConfig, OptimizerConfig, apply_overrides, preset
from llm_jax.data import packing
from llm_jax.data.loader import DataConfig
from llm_jax.lora import LoRAConfig
from llm_jax.stages import dpo, grpo, mlm, ppo, pretrain, reward, sft
from llm_jax.stages.grpo import GRPOConfig
from llm_jax.stages.ppo import PPOConfig

GiB = 1024 ** 3


# ---------------------------------------------------------------------------
# The chips: what libtpu calls them and what one chip has


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # the topology prefix libtpu takes: "v5p" in v5p:2x2x1
    device_kinds: tuple[str, ...]  # `device.device_kind` as libtpu reports it (first: libtpu 0.0.42)
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: int  # HBM per chip, as documented
    usable_hbm_bytes: int  # what the TPU compiler lets one chip's program use (`fits` compares with it)
    hbm_bandwidth: float  # bytes/s per chip
    cores_per_chip: int  # TensorCores; accelerator types count them on v4/v5p (v5p-8 = 4 chips)
    accelerator_prefix: str  # gcloud's --type prefix
    examples: tuple[str, ...]


# Per-chip figures from the Google Cloud TPU documentation, one page per generation:
#   v4   https://cloud.google.com/tpu/docs/v4   "Peak compute per chip 275 teraflops (bf16 or int8)",
#        "HBM2 capacity and bandwidth 32 GiB, 1200 GBps"
#   v5e  https://cloud.google.com/tpu/docs/v5e  "Peak compute per chip (bf16) 197 TFLOPs",
#        "HBM2 capacity and bandwidth 16 GB, 819 GBps"
#   v5p  https://cloud.google.com/tpu/docs/v5p  "Peak compute per chip (bf16) 459 TFLOPs",
#        "HBM2e capacity and bandwidth 95GB, 2765 GBps"
#   v6e  https://cloud.google.com/tpu/docs/v6e  "Peak compute per chip (bf16) 918 TFLOPs",
#        "HBM capacity per chip 32 GB", "HBM bandwidth per chip 1640 GBps" (an older
#        revision of the page said 1600)
# Capacities are taken as binary (GiB): the v4 page says GiB and HBM stacks come in
# binary sizes. Bandwidths are decimal (1 GBps = 1e9 B/s).
# Usable HBM: the "available HBM" libtpu 0.0.42's compiler names when it refuses a
# program that does not fit ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the
# total memory required for HLO temporaries (...) exceeds available HBM (15.75G)"
# on v5e; 30.75G v4, 95.74G v5p, 31.25G v6e), probed with oversized steps: the
# runtime keeps the rest (v5p's 95.74 GiB is more than its page's "95GB").
# device_kind: what libtpu 0.0.42 reports for each topology (probed with
# jax.experimental.topologies); jax.experimental.mesh_utils also knows the
# "TPU v5e" / "TPU v5p" spellings, accepted too.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", ("TPU v4",), 275e12, 32 * GiB, int(30.75 * GiB), 1200e9, 2, "v4",
               ("v4:2x2x1", "v4:2x2x2", "v4:2x4x4", "v4:4x4x4")),
    "v5e": Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16 * GiB, int(15.75 * GiB), 819e9, 1, "v5litepod",
                ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:16x16")),
    "v5p": Chip("v5p", ("TPU v5", "TPU v5p"), 459e12, 95 * GiB, int(95.74 * GiB), 2765e9, 2, "v5p",
                ("v5p:2x2x1", "v5p:2x2x2", "v5p:2x4x4", "v5p:4x4x4")),
    "v6e": Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32 * GiB, int(31.25 * GiB), 1640e9, 1, "v6e",
                ("v6e:1x1", "v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:16x16")),
}
ALIASES = {"v5litepod": "v5e"}  # gcloud's name for v5e; libtpu only takes "v5e"


def known_topologies() -> str:
    """One line per generation, for error messages and --help."""
    return "; ".join(f"{c.generation}{' (alias ' + a + ')' if a else ''}: {', '.join(c.examples)}"
                     for c in CHIPS.values()
                     for a in [next((k for k, v in ALIASES.items() if v == c.generation), "")])


def chip_for_kind(device_kind: str) -> Chip:
    for chip in CHIPS.values():
        if device_kind in chip.device_kinds:
            return chip
    raise ConfigError(f"libtpu reports device kind {device_kind!r}, which has no entry in llm_jax.aot.CHIPS "
                      f"(known: {sorted(k for c in CHIPS.values() for k in c.device_kinds)})")


# ---------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class AOTSettings:
    """One ahead-of-time compile: a stage of a model on a TPU topology.

    `model` is the full model config (the CLI starts from `--preset` and applies
    model.* on top); `label` only names it in the printed table."""

    stage: str = "pretrain"
    topology: str = "v5p:2x2x1"  # GEN:AxB or GEN:AxBxC (chips per axis); see known_topologies()
    num_slices: int = 1  # > 1: multislice, the data axis spans the slices
    mesh: MeshConfig = MeshConfig(data=1, fsdp=-1, tensor=1)  # global; -1 takes the rest
    batch_size: int = 16  # global rows (rm/dpo: packed rows of chosen and of rejected; ppo, generate, grpo: prompts)
    seq_len: int = 2048  # tokens per row; generate, ppo and grpo: prompt + new tokens
    model: ModelConfig = PRESETS["tiny"]
    label: str = "tiny"
    optim: OptimizerConfig = OptimizerConfig()
    lora: LoRAConfig = LoRAConfig()  # rank > 0: sft, sft_kl, rm, dpo train adapters only
    microbatches: int = 1  # gradient accumulation of the training stages
    kl_coef: float = 0.1  # sft_kl: weight of KL(pi || reference); sft compiles with 0
    max_segments: int = DataConfig.max_segments  # rm, dpo: sequences per packed row (pair_mask width)
    # rm: the pipeline's likelihood reward model (adds lm_scale and the [B, T, V] logits of
    # both sides); False: the scalar head alone. LoRA reward models have no likelihood term.
    rm_likelihood: bool = False
    ppo: PPOConfig = PPOConfig()  # epochs, minibatches, update_microbatches, ...
    grpo: GRPOConfig = GRPOConfig()  # algorithm, group_size, updates, minibatches, kl_coef, ...
    max_new_tokens: int = 0  # generate, ppo, grpo: tokens sampled after the prompt; 0: seq_len // 2

    @property
    def new_tokens(self) -> int:
        return self.max_new_tokens or self.seq_len // 2

    @property
    def prompt_len(self) -> int:
        return self.seq_len - self.new_tokens

    def validate(self) -> "AOTSettings":
        if self.stage not in STAGES:
            raise ConfigError(f"--stage {self.stage!r}: expected one of {', '.join(STAGES)}")
        for name in ("num_slices", "batch_size", "seq_len", "microbatches", "max_segments"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)}={getattr(self, name)} must be positive")
        self.model.validate()
        self.lora.validate(self.model)
        if self.seq_len > self.model.max_len:
            raise ConfigError(f"--seq-len {self.seq_len} exceeds model.max_len={self.model.max_len}; "
                              f"set --set model.max_len={self.seq_len} (rotary models) or a shorter --seq-len")
        if self.stage == "mlm":
            mlm.check_encoder(self.model)
        if self.stage in SAMPLING_STAGES and not self.model.causal:
            raise ConfigError(f"stage {self.stage} samples text: it needs a causal (decoder) model, "
                              "but model.causal=False")
        if self.stage == "sft_kl" and self.kl_coef <= 0:
            raise ConfigError(f"kl_coef={self.kl_coef}: stage sft_kl needs kl_coef > 0 (stage sft is the plain one)")
        if self.lora.enabled and self.stage not in LORA_STAGES:
            raise ConfigError(f"lora.rank={self.lora.rank}: LoRA applies to {', '.join(LORA_STAGES)}; "
                              f"stage {self.stage} trains (or samples from) the full model")
        if self.stage == "rm" and self.lora.enabled and self.rm_likelihood:
            raise ConfigError("rm_likelihood=true with lora.rank > 0: a LoRA reward model "
                              "(lora.lora_reward_loss_fn) has no likelihood term; set rm_likelihood=false")
        if self.stage in SAMPLING_STAGES and not 0 < self.new_tokens < self.seq_len:
            raise ConfigError(f"max_new_tokens={self.new_tokens} must leave a prompt in --seq-len "
                              f"{self.seq_len} (0 < max_new_tokens < seq_len)")
        for section, field in (("ppo", "rollout_batch"), ("grpo", "prompts")):
            default = type(getattr(self, section))()
            for name, flag in ((field, "--batch-size"), ("max_new_tokens", "max_new_tokens")):
                if getattr(getattr(self, section), name) != getattr(default, name):
                    raise ConfigError(f"{section}.{name}: the ahead-of-time {section.upper()} update takes it "
                                      f"from {flag}; leave {section}.{name} at its default")
        if self.stage == "grpo":
            self.grpo_config()
        return self

    def grpo_config(self) -> GRPOConfig:
        """grpo with --batch-size prompts and max_new_tokens new tokens, checked."""
        return dataclasses.replace(self.grpo, prompts=self.batch_size, max_new_tokens=self.new_tokens).validate()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-") if name in ("num_slices", "batch_size", "seq_len") else name


# ---------------------------------------------------------------------------
# Topology and mesh


def libtpu_version() -> str:
    """The installed libtpu's version, for the benchmark tables' headers."""
    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def require_tpu_compiler() -> None:
    """The compile needs libtpu (the TPU compiler), which `jax[tpu]` installs."""
    try:
        import libtpu  # noqa: F401  (jax finds libtpu.so through this package)
    except ImportError:
        if os.environ.get("TPU_LIBRARY_PATH"):
            return  # a libtpu.so given by path, as jax accepts
        raise ConfigError(f'the TPU compiler (libtpu) is not installed: pip install "jax[tpu]=={jax.__version__}" '
                          '(or pip install -e ".[tpu]" in this repository)') from None


def parse_topology(name: str) -> tuple[Chip, tuple[int, ...]]:
    """'v5p:2x2x1' -> (its Chip, (2, 2, 1)); an unknown name lists the known ones."""
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+){1,2})", name.strip().lower())
    generation = ALIASES.get(m.group(1), m.group(1)) if m else None
    if generation not in CHIPS:
        raise ConfigError(f"--topology {name!r}: unknown TPU topology; the form is GEN:AxB or GEN:AxBxC "
                          f"(chips per axis), known generations and examples: {known_topologies()}")
    dims = tuple(int(d) for d in m.group(2).split("x"))
    if min(dims) < 1:
        raise ConfigError(f"--topology {name!r}: every axis needs at least one chip")
    return CHIPS[generation], dims


def _quiet_libtpu(chip: Chip, chips: int) -> None:
    """libtpu, started on a host that is not a TPU VM, asks the GCE metadata server
    what it is running on and prints a page of warnings when there is none. These
    answer it first (setdefault: a value the user set wins). Read once, when libtpu
    starts; checked on v4, v5e, v5p and v6e topologies (any TPU_ACCELERATOR_TYPE
    silences all of them). libtpu also takes /tmp/libtpu_lockfile, meant to keep two
    processes off one TPU; a compile touches no TPU, and without
    ALLOW_MULTIPLE_LIBTPU_LOAD a second compile (or any libtpu process) running at
    the same time fails with "Internal error when accessing libtpu multi-process
    lockfile". Left alone on a TPU VM (/dev/accel*), whose runtime must describe its
    own chips and keep its lock."""
    if glob.glob("/dev/accel*"):
        return
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.accelerator_prefix}-{chips * chip.cores_per_chip}")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology_devices(topology: str, num_slices: int = 1) -> tuple[Chip, list]:
    """The compile-only devices of `num_slices` slices of `topology` (one per chip;
    with several slices each carries `slice_index`)."""
    require_tpu_compiler()
    chip, dims = parse_topology(topology)
    _quiet_libtpu(chip, math.prod(dims))
    from jax.experimental import topologies
    kwargs: dict[str, Any] = {}
    if chip.cores_per_chip == 2:
        kwargs["chip_config_name"] = "megacore"  # one device per chip, as on a v4/v5p VM (v4 lists cores otherwise)
    if len(dims) == 2 and math.prod(dims) < 4:
        kwargs["chips_per_host_bounds"] = (*dims, 1)  # v5e/v6e-1: a sub-host slice (default bounds are 2x2)
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    name = f"{chip.generation}:{'x'.join(map(str, dims))}"
    try:
        devices = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices
    except Exception as e:  # JaxRuntimeError INVALID_ARGUMENT: a shape libtpu does not make
        raise ConfigError(f"--topology {topology!r}: libtpu cannot make it ({str(e).splitlines()[0]}); "
                          f"known generations and examples: {known_topologies()}") from None
    return chip_for_kind(devices[0].device_kind), list(devices)


def resolve_mesh(cfg: MeshConfig, n: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for n devices, one -1 taking the rest."""
    shape = [cfg.data, cfg.fsdp, cfg.tensor]
    if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise sharding.MeshError(f"--mesh {','.join(map(str, shape))}: sizes must be positive, at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise sharding.MeshError(f"--mesh {','.join(map(str, shape))}: the {n} chips are not divisible by "
                                     f"{known}, so -1 has no size")
        shape[shape.index(-1)] = n // known
    return tuple(shape)


def make_mesh(cfg: MeshConfig, devices: list, num_slices: int, topology: str) -> Mesh:
    """The global (data, fsdp, tensor) mesh over every chip of every slice, checked
    against the chip count before anything is compiled. With several slices the
    data axis is the outer one and spans them (slow data-center network between
    slices: only the gradient all-reduce crosses it); fsdp and tensor stay inside
    a slice, on its fast interconnect."""
    n = len(devices)
    shape = resolve_mesh(cfg, n)
    if math.prod(shape) != n:
        raise sharding.MeshError(
            f"--mesh {','.join(map(str, shape))} is data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = "
            f"{math.prod(shape)} chips, but {topology} x {num_slices} slice(s) has {n // num_slices} x "
            f"{num_slices} = {n}; make the three sizes multiply to {n}")
    if num_slices == 1:
        return sharding.make_mesh(MeshConfig(*shape), devices)
    if shape[0] % num_slices:
        raise sharding.MeshError(f"--num-slices {num_slices}: the data axis spans the slices, so mesh "
                                 f"data={shape[0]} must be a multiple of {num_slices}")
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_hybrid_device_mesh((shape[0] // num_slices, shape[1], shape[2]),
                                                (num_slices, 1, 1), devices)
    return Mesh(grid, sharding.AXES, axis_types=(AxisType.Auto,) * 3)


# ---------------------------------------------------------------------------
# Stage builders: abstract inputs -> the stage's own jitted step, lowered


@dataclasses.dataclass(frozen=True)
class Built:
    """What a stage builder hands back."""

    lowered: Any  # jax.stages.Lowered of the stage's step
    traced_flops: float  # `jaxpr_flops` of the same step (all chips together)
    model_flops: float  # FLOPs of one step by the formula in `flops_formula` (all chips together)
    flops_formula: str
    planned: int | None = None  # llm_jax.plan's per-chip total for the same settings, None: not modelled
    planned_as: str = ""  # what was asked of the planner
    # Per chip, arrays that stay in HBM for the whole stage but are not arguments of
    # this step (PPO's frozen reference and reward model): counted in `fits`.
    resident_bytes: int = 0
    min_bytes_per_chip: float = 0.0  # bytes each chip must read at least (see `roofline`)


_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)  # a raw PRNG key, abstract: eval_shape needs no backend


def _placed(tree, mesh: Mesh):
    """ShapeDtypeStructs of `tree` carrying the partitioning table's shardings."""
    shards = sharding.tree_shardings(tree, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shards)


def _lm_params(cfg: ModelConfig, mesh: Mesh):
    return _placed(jax.eval_shape(lambda r: model.init(cfg, r), _KEY), mesh)


def _train_state(init_params: Callable, optimizer, mesh: Mesh):
    """(abstract TrainState, its shardings), as `train.create_train_state` makes them."""
    def init(rng):
        params = init_params(rng)
        return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params), rng=rng)
    abstract = jax.eval_shape(init, _KEY)
    shardings = sharding.tree_shardings(abstract, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        shardings), shardings


def _batch(mesh: Mesh, rows: int, seq_len: int, prefixes=("",), max_segments=None, extra=()) -> dict:
    """The loader's batch (keys and dtypes from `packing.empty_batch`, the loader's own
    template) as ShapeDtypeStructs split over (data, fsdp); `extra`: (key, width)
    float32 [rows, width] additions (DPO's cached reference log-probs)."""
    template = packing.empty_batch(1, seq_len, prefixes, max_segments=max_segments)
    template.update({k: np.zeros((1, width), np.float32) for k, width in extra})
    return {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=sharding.batch_sharding(mesh, v.ndim))
            for k, v in template.items()}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that enter a matmul for every token: all of them but lookup-only
    tables (an untied input embedding, learned positions, token types)."""
    params = jax.eval_shape(lambda r: model.init(cfg, r), _KEY)
    n = model.count_params(params)
    lookups = [k for k in ("pos_embed", "type_embed") if k in params] + ([] if cfg.tie_embeddings else ["embed"])
    return n - sum(int(np.prod(params[k].shape)) for k in lookups)


def _planned(s: AOTSettings, mesh: Mesh, rows: int, extra: int = 0) -> int:
    """llm_jax.plan's per-chip total for full training of the model on `rows`
    sequences per pass (plus `extra` bytes it does not model)."""
    shape = tuple(mesh.shape[a] for a in sharding.AXES)
    return plan.plan(s.model, plan.abstract_mesh(*shape), rows, s.seq_len, s.optim).total + extra


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of a (global) jaxpr: 2 per multiply-add of every dot_general, a
    scan body times its length, the larger branch of a cond, a shard_map body
    times its shards, the inner jaxprs of jit, remat (its recomputation is in the
    backward pass's jaxpr, so it counts, as far as the backward needs it) and
    custom derivatives. What XLA's count misses with scanned layers (module
    docstring). Left out, so the count stays a lower bound: elementwise work, a
    while loop's trips beyond the first (the stages use scan) and Pallas kernels
    (the splash attention kernel `attention_impl="auto"` picks on TPU for T a
    multiple of 128): their FLOPs are not in the trace."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contracting)
        elif name == "cond":
            total += max(jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
        elif name != "pallas_call":
            inner = sum(jaxpr_flops(j) for j in jaxprs_in_params(eqn.params))
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "shard_map":  # the body sees one shard's blocks
                axes = eqn.params.get("newly_manual_axes", eqn.params.get("manual_axes", ()))
                inner *= math.prod(eqn.params["mesh"].shape[a] for a in axes)
            total += inner
    return total


def _traced_flops(fn, mesh: Mesh, *args) -> float:
    """jaxpr_flops of fn(*args), traced under the mesh as its jit is (backend choices
    follow the mesh's platform)."""
    with jax.set_mesh(mesh):
        return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _lower_train(s: AOTSettings, mesh: Mesh, loss_fn, normalizer_fn, tx, schedule, state, shardings, batch,
                 frozen=None):
    """The training stages' step, exactly as the experiments build it: (lowered, traced FLOPs)."""
    sharding.check_batch_fits_mesh(s.batch_size, s.microbatches, mesh)
    train_step = train.make_train_step(loss_fn, normalizer_fn, tx, schedule, s.microbatches)
    step = train.jit_train_step(train_step, mesh, shardings)
    return step.lower(state, batch, frozen), _traced_flops(train_step, mesh, state, batch, frozen)


def _optimizer(s: AOTSettings):
    return train.make_optimizer(s.optim, 1000)  # the step count only shapes the schedule's values


def _lm_stage(s: AOTSettings, mesh: Mesh, loss_fn, normalizer_fn, batch, tokens: int, *, passes: int = 1,
              reference: bool = False) -> Built:
    """A stage that trains the LM itself (pretrain, mlm, sft, sft_kl, dpo): full
    params + AdamW, or with LoRA the adapters over a frozen base.

    tokens: tokens through the model per step; passes: forward passes per row over
    them (2 for pairs); reference: a frozen reference model is read too (sft_kl)."""
    cfg, n = s.model, matmul_params(s.model)
    tx, schedule = _optimizer(s)
    base = _lm_params(cfg, mesh)
    rows = s.batch_size // s.microbatches * passes
    if s.lora.enabled:
        state, shards = _train_state(lambda r: lora.init_adapters(s.lora, cfg, r), tx, mesh)
        wrapped = lora.lora_loss_fn(loss_fn, s.lora, base_as_reference=reference)
        lowered, traced = _lower_train(s, mesh, wrapped, normalizer_fn, tx, schedule, state, shards, batch, base)
        # Forward 2N and the activations' backward 2N per token; the frozen base gets no
        # weight gradient (the adapters' FLOPs are left out: rank << d_model).
        return Built(lowered, traced, (4 + 2 * reference) * n * tokens,
                     f"{4 + 2 * reference} N tokens (LoRA: forward + activation backward"
                     f"{', + the reference forward' if reference else ''}), N = {n:,}",
                     None, "not modelled: the planner plans full-parameter training, not LoRA")
    state, shards = _train_state(lambda r: model.init(cfg, r), tx, mesh)
    frozen = base if reference else None
    lowered, traced = _lower_train(s, mesh, loss_fn, normalizer_fn, tx, schedule, state, shards, batch, frozen)
    extra = plan.sharded_bytes(base, mesh) if reference else 0
    return Built(lowered, traced, (6 + 2 * reference) * n * tokens,
                 f"{6 + 2 * reference} N tokens{' (+ the reference forward)' if reference else ''}, N = {n:,}",
                 _planned(s, mesh, rows, extra),
                 f"full training on {rows} sequences per pass" + (" + the frozen reference's params" if reference
                                                                  else ""))


def _pretrain(s: AOTSettings, mesh: Mesh) -> Built:
    batch = _batch(mesh, s.batch_size, s.seq_len)
    return _lm_stage(s, mesh, pretrain.clm_loss_fn(s.model), pretrain.weight_sum, batch, s.batch_size * s.seq_len)


def _mlm(s: AOTSettings, mesh: Mesh) -> Built:
    batch = _batch(mesh, s.batch_size, s.seq_len)  # MaskingLoader's batch: the same five fields
    return _lm_stage(s, mesh, mlm.mlm_loss_fn(s.model), mlm.normalizer, batch, s.batch_size * s.seq_len)


def _sft(s: AOTSettings, mesh: Mesh) -> Built:
    batch = _batch(mesh, s.batch_size, s.seq_len)
    return _lm_stage(s, mesh, sft.sft_loss_fn(s.model, 0.0), sft.weight_sum, batch, s.batch_size * s.seq_len)


def _sft_kl(s: AOTSettings, mesh: Mesh) -> Built:
    batch = _batch(mesh, s.batch_size, s.seq_len)
    return _lm_stage(s, mesh, sft.sft_loss_fn(s.model, s.kl_coef), sft.weight_sum, batch,
                     s.batch_size * s.seq_len, reference=True)


def _preference_batch(s: AOTSettings, mesh: Mesh, with_reference: bool) -> dict:
    extra = [(k, s.max_segments) for k in dpo.REF_KEYS] if with_reference else []
    return _batch(mesh, s.batch_size, s.seq_len, packing.PAIR_PREFIXES, s.max_segments, extra)


def _dpo(s: AOTSettings, mesh: Mesh) -> Built:
    # The reference log-probs come with the batch (CachedReferenceLoader): no reference model.
    batch = _preference_batch(s, mesh, with_reference=True)
    return _lm_stage(s, mesh, dpo.dpo_loss_fn(s.model, s.max_segments), reward.pair_count, batch,
                     2 * s.batch_size * s.seq_len, passes=2)


def _rm(s: AOTSettings, mesh: Mesh) -> Built:
    cfg, n = s.model, matmul_params(s.model)
    tx, schedule = _optimizer(s)
    batch = _preference_batch(s, mesh, with_reference=False)
    loss_fn = reward.rm_loss_fn(cfg, s.max_segments)
    tokens = 2 * s.batch_size * s.seq_len
    if s.lora.enabled:
        state, shards = _train_state(lambda r: lora.init_reward_trainable(s.lora, cfg, r), tx, mesh)
        lowered, traced = _lower_train(s, mesh, lora.lora_reward_loss_fn(loss_fn, s.lora), reward.pair_count,
                                       tx, schedule, state, shards, batch, _lm_params(cfg, mesh))
        return Built(lowered, traced, 4 * n * tokens, f"4 N tokens (LoRA: forward + activation backward), N = {n:,}",
                     None, "not modelled: the planner plans full-parameter training, not LoRA")
    state, shards = _train_state(
        lambda r: reward.init_reward_params(cfg, model.init(cfg, r), r, likelihood=s.rm_likelihood), tx, mesh)
    lowered, traced = _lower_train(s, mesh, loss_fn, reward.pair_count, tx, schedule, state, shards, batch)
    rows = 2 * s.batch_size // s.microbatches
    return Built(lowered, traced, 6 * n * tokens, f"6 N tokens (chosen + rejected), N = {n:,}",
                 _planned(s, mesh, rows), f"full training on {rows} sequences per pass (the LM; not the head)")


def _ppo(s: AOTSettings, mesh: Mesh) -> Built:
    """The PPO update (`make_ppo_update`, jitted as `make_ppo_step` does) on a scored
    rollout of batch_size prompts of prompt_len + new_tokens tokens."""
    cfg, n = s.model, matmul_params(s.model)
    B, T, N = s.batch_size, s.seq_len, s.new_tokens
    p = dataclasses.replace(s.ppo, rollout_batch=B, max_new_tokens=N).validate()
    sharding.check_batch_fits_mesh(B, 1, mesh)
    sharding.check_batch_fits_mesh(B // p.minibatches, p.update_microbatches, mesh)
    tx, schedule = train.make_optimizer(s.optim, ppo.optimizer_steps(1000, p))

    def init(rng):
        lm_rng, head_rng = jax.random.split(rng)
        lm = model.init(cfg, lm_rng)
        params = {"policy": lm, "value": {"model": lm, "head": model.init_scalar_head(cfg, head_rng)}}
        return ppo.PPOState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
                            kl_coef=jnp.zeros((), jnp.float32))

    abstract = jax.eval_shape(init, _KEY)
    shards = sharding.tree_shardings(abstract, mesh)
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shards)
    rep = NamedSharding(mesh, P())
    update = jax.jit(ppo.make_ppo_update(cfg, p, tx, schedule), out_shardings=(shards, rep, rep),
                     donate_argnums=0)
    shapes = {"tokens": ((B, T), jnp.int32), "positions": ((B, T), jnp.int32),
              "segment_ids": ((B, T), jnp.int32), "response": ((B, N), jnp.int32),
              **{k: ((B, N), jnp.float32) for k in ("weights", "old_logprobs", "old_values", "advantages",
                                                     "returns")}}
    assert set(shapes) == set(ppo.UPDATE_KEYS), "ppo.UPDATE_KEYS changed: update the scored rollout here"
    scored = {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding.batch_sharding(mesh, len(shape)))
              for k, (shape, dt) in shapes.items()}
    args = (state, scored, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=rep))
    with jax.set_mesh(mesh):  # activation constraints read the mesh at trace time
        lowered = update.lower(*args)
    reference = _lm_params(cfg, mesh)
    reward_model = _placed(jax.eval_shape(
        lambda r: reward.init_reward_params(cfg, model.init(cfg, r), r, likelihood=s.rm_likelihood), _KEY), mesh)
    return Built(lowered, _traced_flops(update, mesh, *args), 6 * 2 * n * B * T * p.epochs,
                 f"6 x 2N x rollout tokens x epochs (policy + value model), N = {n:,}",
                 None, "not modelled: the planner plans one model's training",
                 resident_bytes=plan.sharded_bytes(reference, mesh) + plan.sharded_bytes(reward_model, mesh))


def _generate(s: AOTSettings, mesh: Mesh) -> Built:
    """`generate._sample` with the KV cache: batch_size left-padded prompts of
    prompt_len tokens, new_tokens sampled (temperature 1, no top-k/top-p), a cache of
    seq_len slots."""
    cfg, n = s.model, matmul_params(s.model)
    B, Pn, N = s.batch_size, s.prompt_len, s.new_tokens
    sharding.check_batch_fits_mesh(B, 1, mesh)
    params = _lm_params(cfg, mesh)
    rows, rep = sharding.batch_sharding(mesh, 2), NamedSharding(mesh, P())
    prompt = jax.ShapeDtypeStruct((B, Pn), jnp.int32, sharding=rows)
    args = (params, prompt, prompt, jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))

    def sample(params, tokens, mask, rng, eos_id):
        return generate._sample(cfg, params, tokens, mask, rng, max_new_tokens=N, temperature=1.0, top_k=0,
                                top_p=1.0, eos_id=eos_id, use_cache=True)

    with jax.set_mesh(mesh):  # the model's backend choices and activation constraints follow the mesh
        lowered = generate._sample.lower(cfg, *args[:4], max_new_tokens=N, temperature=1.0, top_k=0, top_p=1.0,
                                         eos_id=args[4], use_cache=True)
    # Every decode step reads every local weight once: N passes over the params at least.
    return Built(lowered, _traced_flops(sample, mesh, *args), 2 * n * B * (Pn + N), f"2 N tokens (prompt + new), N = {n:,}", None,
                 "not modelled: the planner plans training", min_bytes_per_chip=N * plan.sharded_bytes(params, mesh))


def _grpo(s: AOTSettings, mesh: Mesh) -> Built:
    """The GRPO update (`grpo.make_grpo_update`, jitted as `make_grpo_step` does) on
    batch_size prompts x group_size sampled rows of prompt_len + new_tokens tokens,
    with the sampling policy's log-probs when it takes several optimizer steps and
    the reference's with a KL penalty (what `make_grpo_step`'s score adds)."""
    cfg, n = s.model, matmul_params(s.model)
    g = s.grpo_config()
    R, Pn, N = g.rows, s.prompt_len, s.new_tokens
    sharding.check_batch_fits_mesh(s.batch_size, 1, mesh)  # the sampler splits the prompts (grpo.check)
    sharding.check_batch_fits_mesh(R // g.minibatches, g.update_microbatches, mesh)
    tx, schedule = train.make_optimizer(s.optim, 1000 * g.optimizer_steps_per_step)
    state, shards = _train_state(lambda r: model.init(cfg, r), tx, mesh)
    rep = NamedSharding(mesh, P())
    update = jax.jit(grpo.make_grpo_update(cfg, g, tx, schedule), out_shardings=(shards, rep, rep),
                     donate_argnums=0)
    # The sampled rows' fields, keys and dtypes from the rollout builder itself.
    rollout = jax.eval_shape(ppo.build_rollout, *(jax.ShapeDtypeStruct(shape, jnp.int32)
                                                   for shape in ((R, Pn), (R, Pn), (R, N))))
    scored = [k for k, needed in (("old_logprobs", g.optimizer_steps_per_step > 1), ("ref_logprobs", g.kl_coef > 0))
              if needed]
    fields = {**rollout, **{k: jax.ShapeDtypeStruct((R, N), jnp.float32) for k in scored}}
    batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim))
             for k, x in fields.items()}
    args = (state, batch, jax.ShapeDtypeStruct((R,), jnp.float32, sharding=sharding.batch_sharding(mesh, 1)),
            jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
    with jax.set_mesh(mesh):  # activation constraints read the mesh at trace time
        lowered = update.lower(*args)
    micro = R // g.minibatches // g.update_microbatches
    reference = plan.sharded_bytes(_lm_params(cfg, mesh), mesh) if g.kl_coef > 0 else 0
    return Built(lowered, _traced_flops(update, mesh, *args), 6 * n * R * s.seq_len * g.updates,
                 f"6 N x rows x (prompt + new tokens) x updates, rows = {s.batch_size} prompts x {g.group_size}, "
                 f"N = {n:,}", _planned(s, mesh, micro),
                 f"full training on {micro} sequences per pass (the update; not the sampler's KV cache)",
                 resident_bytes=reference)


# The stage table: name -> builder(settings, mesh) -> Built. A new stage is one entry.
STAGES: dict[str, Callable[[AOTSettings, Mesh], Built]] = {
    "pretrain": _pretrain,
    "mlm": _mlm,
    "sft": _sft,
    "sft_kl": _sft_kl,
    "rm": _rm,
    "dpo": _dpo,
    "ppo": _ppo,
    "generate": _generate,
    "grpo": _grpo,
}
LORA_STAGES = ("sft", "sft_kl", "rm", "dpo")
SAMPLING_STAGES = ("ppo", "generate", "grpo")  # causal models only; --seq-len = prompt + max_new_tokens


# ---------------------------------------------------------------------------
# Compile and read back


def roofline(chip: Chip, chips: int, flops_per_chip: float, bytes_per_chip: float, model_flops: float,
             traced_flops: float = 0.0, min_bytes_per_chip: float = 0.0) -> dict:
    """Lower bound on the step time and the MFU it allows.

    step >= max(FLOPs per chip / peak FLOP/s, bytes per chip / HBM bandwidth), where
    the FLOPs per chip are the largest of XLA's count, the traced matmul FLOPs
    (`jaxpr_flops`, remat's recomputation and attention included) and the model's,
    each global count split evenly over the chips, and the bytes the larger of
    XLA's count and `min_bytes_per_chip`: XLA counts each while-loop body once
    (module docstring), so alone it would bound the step by one layer's work.
    MFU <= model_flops / (chips x peak x bound): model FLOPs (6 N per token for
    training) leave out recomputation and attention's T^2 term, as MFU does."""
    flops = max(flops_per_chip, traced_flops / chips, model_flops / chips)
    bytes_ = max(bytes_per_chip, min_bytes_per_chip)
    compute_s, memory_s = flops / chip.peak_flops, bytes_ / chip.hbm_bandwidth
    bound = max(compute_s, memory_s)
    return {"step_s_lower_bound": bound,
            "mfu_upper_bound": model_flops / (chips * chip.peak_flops * bound) if bound > 0 else 0.0,
            "compute_s": compute_s, "memory_s": memory_s,
            "bound_by": "compute" if compute_s >= memory_s else "memory"}


def compile_stage(settings: AOTSettings) -> dict:
    """Compiles `settings.stage` for the TPU topology and returns the JSON-ready dict
    the CLI prints last:

        topology, num_slices, chips (all slices), device_kind, stage,
        per_chip_bytes {arguments, outputs, temp, alias, total}: XLA's memory analysis
            of one chip; total = arguments + outputs + temp - alias (donated state),
        hbm_bytes (one chip's HBM a program may use, `Chip.usable_hbm_bytes`),
        hbm_capacity_bytes (as documented), fits (total + resident_bytes <= hbm_bytes),
        resident_bytes (per chip, frozen models a stage holds beside its step: PPO's
            reference and reward model, GRPO's reference when grpo.kl_coef > 0),
        flops_per_chip (XLA's cost analysis, one chip, each loop body once),
        bytes_accessed_per_chip (the same), traced_flops (`jaxpr_flops` of the step, all
            chips: loops counted in full, remat included), model_flops (whole step, all
            chips; formula in flops_formula), compile_s (XLA), lower_s (tracing + lowering),
        planned_total_bytes (llm_jax.plan for the same settings, None where it has no
            model of the stage; planned_as says what was planned),
        roofline {step_s_lower_bound, mfu_upper_bound, compute_s, memory_s, bound_by},
        compile_error (None, or the compiler's message when it refused the program).

    A step that does not fit is a result, not an error: the TPU compiler refuses a
    program whose temporaries exceed the chip's HBM (RESOURCE_EXHAUSTED); then
    fits is False, compile_error holds its message (it names the bytes required),
    per_chip_bytes, flops_per_chip and bytes_accessed_per_chip are None, and the
    roofline rests on the traced and model FLOPs alone.

    Raises ConfigError / MeshError (before compiling) for settings that cannot work."""
    chip, dims = parse_topology(settings.topology)
    _quiet_libtpu(chip, math.prod(dims))  # before anything (a LoRA check's PRNGKey) starts a backend
    s = settings.validate()
    chip, devices = topology_devices(s.topology, s.num_slices)
    mesh = make_mesh(s.mesh, devices, s.num_slices, s.topology)
    sharding.check_model_fits_mesh(s.model, mesh)
    t0 = time.perf_counter()
    built = STAGES[s.stage](s, mesh)
    t1 = time.perf_counter()
    per_chip = flops = accessed = error = None
    try:
        compiled = built.lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        error = str(e).strip().splitlines()[0]
    t2 = time.perf_counter()
    if error is None:
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
        per_chip = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
                    "temp": int(mem.temp_size_in_bytes), "alias": int(mem.alias_size_in_bytes)}
        per_chip["total"] = per_chip["arguments"] + per_chip["outputs"] + per_chip["temp"] - per_chip["alias"]
        flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return {
        "topology": s.topology, "num_slices": s.num_slices, "chips": len(devices),
        "device_kind": devices[0].device_kind, "stage": s.stage,
        "mesh": dict(mesh.shape), "batch_size": s.batch_size, "seq_len": s.seq_len,
        "per_chip_bytes": per_chip, "hbm_bytes": chip.usable_hbm_bytes, "hbm_capacity_bytes": chip.hbm_bytes,
        "resident_bytes": built.resident_bytes,
        "fits": error is None and per_chip["total"] + built.resident_bytes <= chip.usable_hbm_bytes,
        "flops_per_chip": flops, "bytes_accessed_per_chip": accessed,
        "traced_flops": float(built.traced_flops),
        "model_flops": float(built.model_flops), "flops_formula": built.flops_formula,
        "compile_s": round(t2 - t1, 2), "lower_s": round(t1 - t0, 2),
        "planned_total_bytes": built.planned, "planned_as": built.planned_as,
        "roofline": roofline(chip, len(devices), flops or 0.0, accessed or 0.0, built.model_flops,
                             built.traced_flops, max(built.min_bytes_per_chip, per_chip["arguments"] if per_chip else 0)),
        "compile_error": error,
    }


# ---------------------------------------------------------------------------
# Command line


def _gib(x: float) -> str:
    return f"{x / GiB:9.3f} GiB"


def format_table(r: dict, s: AOTSettings) -> str:
    b, roof = r["per_chip_bytes"], r["roofline"]
    m = r["mesh"]
    usable = f"{r['hbm_bytes'] / GiB:g} GiB of HBM per chip usable"
    lines = [
        f"{s.label} {s.stage} on {r['topology']} x {r['num_slices']} slice(s): {r['chips']} chips "
        f"({r['device_kind']}), mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}, "
        f"batch {r['batch_size']} x {r['seq_len']}, compute {s.model.dtype}, remat {s.model.remat}"
        + (f", LoRA rank {s.lora.rank} on {','.join(s.lora.targets)}" if s.lora.enabled else ""),
    ]
    if b is None:
        lines.append(f"  does NOT fit in {usable}: the TPU compiler refused the step: {r['compile_error']}")
    else:
        lines += [
            "  per chip (XLA memory analysis)",
            *(f"    {k:<10} {b[k]:>16,d} B {_gib(b[k])}" for k in ("arguments", "outputs", "temp", "alias")),
            f"    {'total':<10} {b['total']:>16,d} B {_gib(b['total'])}  (arguments + outputs + temp - alias)",
        ]
        if r["resident_bytes"]:
            lines.append(f"    {'resident':<10} {r['resident_bytes']:>16,d} B {_gib(r['resident_bytes'])}  "
                         "(frozen models held beside the step)")
        need = b["total"] + r["resident_bytes"]
        lines.append(f"  {'fits' if r['fits'] else 'does NOT fit'} in {usable} ({need / r['hbm_bytes']:.0%} used)")
    if r["planned_total_bytes"] is not None:
        ratio = "" if b is None else f"; compiled / planned = {b['total'] / r['planned_total_bytes']:.2f}"
        lines.append(f"  planner (llm_jax.plan, {r['planned_as']}): {_gib(r['planned_total_bytes'])}{ratio}")
    else:
        lines.append(f"  planner: {r['planned_as']}")
    xla = "no program" if b is None else f"{r['flops_per_chip']:.4g} (each loop body once)"
    lines += [
        f"  FLOPs per chip: XLA {xla}, traced matmuls "
        f"{r['traced_flops'] / r['chips']:.4g}, model {r['model_flops'] / r['chips']:.4g} "
        f"({r['flops_formula']}; both over {r['chips']} chips)",
    ]
    if b is not None:
        lines.append(f"  bytes accessed per chip (XLA, each loop body once): {r['bytes_accessed_per_chip']:.4g}")
    lines += [
        f"  roofline: step >= {roof['step_s_lower_bound'] * 1e3:.3f} ms ({roof['bound_by']}-bound; compute "
        f"{roof['compute_s'] * 1e3:.3f} ms, memory {roof['memory_s'] * 1e3:.3f} ms), "
        f"MFU <= {roof['mfu_upper_bound']:.1%}",
        f"  compile: {r['compile_s']:.1f} s (trace + lower {r['lower_s']:.1f} s)",
    ]
    return "\n".join(lines)


def _parse_mesh(text: str) -> MeshConfig:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:  # int("x"): reported below with the rest
        sizes = []
    if len(sizes) != 3:
        raise ConfigError(f"--mesh {text!r}: expected three sizes DATA,FSDP,TENSOR (one may be -1), e.g. 1,4,1")
    return MeshConfig(*sizes)


def settings_from_args(argv: list[str] | None = None) -> AOTSettings:
    p = argparse.ArgumentParser(prog="python -m llm_jax.aot",
                                description="Compile a stage's step for a TPU slice ahead of time (no TPU needed).",
                                epilog=f"Known topologies: {known_topologies()}.")
    p.add_argument("--preset", required=True, help=f"model preset ({', '.join(PRESETS)})")
    p.add_argument("--stage", required=True, help=f"one of {', '.join(STAGES)}")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5p:2x2x1, v6e:2x2, v5e:2x4, v4:2x2x1")
    p.add_argument("--num-slices", type=int, default=1, help="slices joined over the data-center network")
    p.add_argument("--mesh", required=True, help="DATA,FSDP,TENSOR over all chips of all slices, e.g. 1,4,1")
    p.add_argument("--batch-size", type=int, required=True, help="global batch in sequences")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model.*, optim.*, lora.*, ppo.*, grpo.*, microbatches, kl_coef, max_new_tokens, ...")
    args = p.parse_args(argv)
    s = AOTSettings(stage=args.stage, topology=args.topology, num_slices=args.num_slices,
                    mesh=_parse_mesh(args.mesh), batch_size=args.batch_size, seq_len=args.seq_len,
                    model=preset(args.preset), label=args.preset)
    return apply_overrides(s, args.set)


def main(argv: list[str] | None = None) -> int:
    settings = settings_from_args(argv)
    result = compile_stage(settings)
    print(format_table(result, settings))
    print(json.dumps(result))
    return 0 if result["fits"] else 1  # as llm_jax.plan: scripts can test the exit status


if __name__ == "__main__":
    sys.exit(cli.run(main))
