"""The device mesh and the one partitioning table.

Three mesh axes, as in Levanter's three knobs:
    data    pure data parallelism: the batch is split, weights are replicated
    fsdp    the batch is split AND every large weight is split along one
            dimension (ZeRO-3 / FSDP: weights are all-gathered per layer)
    tensor  Megatron tensor parallelism: attention heads and the MLP hidden
            dimension are split; activations are reduced after o / down

`PARTITION_RULES` below is the whole sharding story for weights: a leaf's last
name picks a rule, one mesh axis (or None) per dimension. The optimizer state
reuses it because Adam's moments carry the same names and shapes. Activations
are constrained in one place, at block boundaries (`constrain_activations`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llm_jax.config import MeshConfig
from llm_jax.errors import MeshError

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both

# leaf name -> mesh axis for each dimension. Stacked layer weights carry a
# leading L axis that is never split. Names not listed (norm scales, output
# biases, scalar heads, step counters) are replicated: they are small.
PARTITION_RULES: dict[str, tuple] = {
    "embed": ("tensor", "fsdp"),  # [V, D]
    "pos_embed": (None, "fsdp"),  # [max_len, D]
    "lm_head": ("fsdp", "tensor"),  # [D, V]
    "q": (None, "fsdp", "tensor", None),  # [L, D, N, H]
    "k": (None, "fsdp", "tensor", None),  # [L, D, G, H]
    "v": (None, "fsdp", "tensor", None),  # [L, D, G, H]
    "o": (None, "tensor", None, "fsdp"),  # [L, N, H, D]
    "q_bias": (None, "tensor", None),  # [L, N, H]
    "k_bias": (None, "tensor", None),  # [L, G, H]
    "v_bias": (None, "tensor", None),  # [L, G, H]
    "up": (None, "fsdp", "tensor"),  # [L, D, F]
    "gate": (None, "fsdp", "tensor"),  # [L, D, F]
    "down": (None, "tensor", "fsdp"),  # [L, F, D]
    "up_bias": (None, "tensor"),  # [L, F]
    "gate_bias": (None, "tensor"),  # [L, F]
}


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (of all processes).

    One axis may be -1 to take what the others leave. The product must equal
    the device count exactly: a mesh that silently used a subset would waste
    the rest."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = [cfg.data, cfg.fsdp, cfg.tensor]
    if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise MeshError(f"mesh {dict(zip(AXES, shape))}: sizes must be positive, at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if n % known:
            raise MeshError(f"mesh {dict(zip(AXES, shape))}: {n} devices are not divisible by {known}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise MeshError(f"mesh data={shape[0]} x fsdp={shape[1]} x tensor={shape[2]} = "
                        f"{math.prod(shape)} devices, but {n} are available "
                        f"({devices[0].platform}); set mesh.data/fsdp/tensor to multiply to {n}")
    return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def check_model_fits_mesh(model_cfg, mesh: Mesh) -> None:
    """Tensor parallelism splits heads: they must divide evenly (before any compile)."""
    t = mesh.shape["tensor"]
    for name, heads in (("num_heads", model_cfg.num_heads), ("num_kv_heads", model_cfg.kv_heads)):
        if heads % t:
            raise MeshError(f"model.{name}={heads} is not divisible by mesh.tensor={t}: "
                            "tensor parallelism splits attention heads")
    if model_cfg.d_ff % t:
        raise MeshError(f"model.d_ff={model_cfg.d_ff} is not divisible by mesh.tensor={t}")


def check_batch_fits_mesh(batch_size: int, microbatches: int, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % microbatches:
        raise MeshError(f"train.batch_size={batch_size} is not divisible by train.microbatches={microbatches}")
    if (batch_size // microbatches) % shards:
        raise MeshError(f"a microbatch of {batch_size // microbatches} sequences cannot be split over "
                        f"data x fsdp = {shards} devices; make train.batch_size a multiple of "
                        f"{shards * microbatches}")


def _leaf_name(path) -> str | None:
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
        if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name not in ("mu", "nu"):
            return entry.name
    return None


def spec_for(path, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The PartitionSpec of one leaf: its rule, with any axis that does not divide
    its dimension dropped (e.g. GPT-2's vocab 50257 over tensor=2)."""
    rule = PARTITION_RULES.get(_leaf_name(path))
    if rule is None or len(rule) != len(shape):
        return P()
    return P(*(ax if ax is not None and dim % mesh.shape[ax] == 0 else None
               for ax, dim in zip(rule, shape)))


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree of arrays or ShapeDtypeStructs (params, optimizer state)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path, np.shape(x), mesh)), tree)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host batch (tree of arrays with a leading batch dim) on the mesh.

    On one process this is device_put; on several, each process passes its own
    rows and `make_array_from_process_local_data` assembles the global array."""
    def put(x):
        x = np.asarray(x)
        s = batch_sharding(mesh, x.ndim)
        if jax.process_count() == 1:
            return jax.device_put(x, s)
        return jax.make_array_from_process_local_data(s, x)
    return jax.tree.map(put, batch)


def _active_mesh():
    """The mesh being traced under (`jax.set_mesh`) if it has our axes, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return None
    return mesh


def target_platform() -> str:
    """The platform the code is being traced for: that of the mesh set with
    `jax.set_mesh` when it has devices, else the default backend. An ahead-of-time
    compile for a TPU slice (`llm_jax.aot`) traces on a CPU host under a mesh of
    TPU devices; backend-specific choices (attention kernel, the CPU-only tied-head
    backward) must follow the target, not the host."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def constrain_activations(x: jax.Array) -> jax.Array:
    """Pins [B, ...] activations to batch-over-(data, fsdp) when tracing under a mesh
    with our axes; a no-op otherwise, so the model runs unsharded in tests,
    notebooks and other people's code."""
    mesh = _active_mesh()
    if mesh is None or x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return x  # no mesh, or e.g. a single prompt while sampling
    return jax.lax.with_sharding_constraint(x, P(BATCH, *([None] * (x.ndim - 1))))


def gather_embedding_table(table: jax.Array) -> jax.Array:
    """The [V, D] table with its fsdp split all-gathered before a token lookup.

    The lookup (a gather) from a table split along D cannot produce batch-split
    activations directly; XLA would replicate the whole result instead. With only
    the vocab split (tensor) the gather becomes a masked lookup plus a sum over
    the tensor axis, which SPMD handles well."""
    mesh = _active_mesh()
    if mesh is None:
        return table
    vocab_axis = "tensor" if table.shape[0] % mesh.shape["tensor"] == 0 else None
    return jax.lax.with_sharding_constraint(table, P(vocab_axis, None))


def sharded_init(init_fn, mesh: Mesh, *args) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` with every output born sharded: eval_shape gives the
    tree, the table gives its shardings, jit(out_shardings=...) materializes it, so
    no device ever holds a full copy. Returns (tree, shardings)."""
    abstract = jax.eval_shape(init_fn, *args)
    shardings = tree_shardings(abstract, mesh)
    with jax.set_mesh(mesh):
        tree = jax.jit(init_fn, out_shardings=shardings)(*args)
    return tree, shardings


def per_device_bytes(tree: Any) -> int:
    """Bytes of `tree` held by one device (the most-loaded one)."""
    per_device: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values()) if per_device else 0


def abstract_params(init_fn, mesh: Mesh, *args) -> Any:
    """Shapes/dtypes of `init_fn(*args)` with the shardings of the partitioning table:
    the target a stage's weights are restored onto (any mesh shape)."""
    shapes = jax.eval_shape(init_fn, *args)
    shards = tree_shardings(shapes, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards)
