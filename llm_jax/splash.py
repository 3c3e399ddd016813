"""Splash attention: the Pallas TPU flash-attention kernel behind `model.attention(impl="splash")`.

    out = attention(q, k, v, segment_ids, causal=True, scale=None)   # [B, T, N, H]

The kernel (`jax.experimental.pallas.ops.tpu.splash_attention`) never forms the
[T, S] score matrix: it walks q/kv blocks with an online softmax, takes the
causal mask as a lazy block-sparse pattern (fully masked blocks are skipped,
not computed) and the packing mask as segment ids compared inside each block.
So the dense [B, 1, T, S] bool mask the XLA path builds, and the [B, N, T, S]
float32 scores it materializes, never exist (at T=4096 the scores alone are
64 MiB per head per sequence).

It runs one sequence at a time ([N, T, H] per call, so we vmap over B) and on
one device (so under a mesh it runs inside `jax.shard_map`, batch over
("data", "fsdp"), heads over "tensor"). Off TPU it runs in Pallas interpret
mode: slow, but the same kernel code, so CPU tests check its numbers.

Shapes the kernel takes (`unsupported_reason` checks them before tracing, so a
bad config is a ConfigError, not a Mosaic traceback):
  * sequence lengths T and S multiples of 128: the kv block (and, with segment
    ids, the backward's q block) must be a multiple of the TPU's 128 vector
    lanes, and blocks must tile the sequence exactly. Blocks are the largest of
    512, 256, 128 dividing T (`block_size`; v5e compiles 512 blocks at T=8192
    with 128-wide bfloat16 heads and T=4096 with float32 ones);
  * any head size (v5e compiles 8 to 256, e.g. 20, 40, 96; sizes under 128
    leave lanes idle, a speed cost only);
  * N query heads a multiple of G key/value heads (grouped-query attention;
    `ModelConfig.validate` already demands it);
  * self-attention when segment ids are given (T == S, one id array);
  * compute dtype float32 or bfloat16 on TPU (Mosaic fails to load float16 tiles).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from llm_jax.config import ConfigError
from llm_jax.sharding import BATCH, _active_mesh, target_platform

LANES = 128  # TPU vector lane width: block sizes (and so sequence lengths) are multiples of it
# Largest block tried: 512 x 512 tiles keep the MXU busy and fit VMEM (MaxText's
# default); smaller ones only when T needs them.
MAX_BLOCK = 512


def block_size(length: int) -> int:
    """The largest of 512, 256, 128 dividing `length` (a multiple of 128)."""
    return next(b for b in (MAX_BLOCK, 256, LANES) if length % b == 0)


def unsupported_reason(q_len: int, kv_len: int, dtype, *,
                       platform: str | None = None) -> str | None:
    """Why the splash kernel cannot take these shapes on `platform` (default: the
    target being traced for), or None when it can."""
    platform = platform or target_platform()
    if platform not in ("tpu", "cpu"):
        return (f"the splash kernel is a Pallas TPU (Mosaic) kernel and cannot run on {platform}; "
                "use model.attention_impl='auto' (cuDNN or XLA there)")
    if q_len % LANES or kv_len % LANES:
        length = f"{q_len}" if q_len == kv_len else f"{q_len} (keys {kv_len})"
        return (f"sequence length {length} is not a multiple of {LANES}: the kernel's blocks are "
                f"multiples of the TPU's {LANES} lanes and must tile the sequence; make train.seq_len "
                f"(the packed row length) a multiple of {LANES}, or use model.attention_impl='auto' "
                "(XLA for such lengths)")
    if platform == "tpu" and jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
        return (f"compute dtype {jnp.dtype(dtype).name}: the TPU kernel takes float32 or bfloat16 "
                "(Mosaic fails on float16 tiles); set model.dtype='bfloat16'")
    return None


def fits(q_len: int, kv_len: int, dtype) -> bool:
    """Whether "auto" may pick the kernel for these shapes on the target (TPU only)."""
    return target_platform() == "tpu" and unsupported_reason(q_len, kv_len, dtype) is None


def _kernel(num_heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
    """The kernel for one device's heads. Built at trace time, inside the trace
    (its block tables become constants of the program: concrete arrays made here
    could not live on the devices of an ahead-of-time TPU mesh); the numpy work of
    turning the mask into block tables is cached by the library (`process_mask`)."""
    shape = (q_len, kv_len)
    mask = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
    bq, bkv = block_size(q_len), block_size(kv_len)
    # The same blocks forward and backward (dq and dkv kernels): the kernel's
    # defaults are all 128, which leaves the MXU half idle on long sequences.
    blocks = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                   block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                   block_q_dq=bq, block_kv_dq=bkv)
    # One mask per head (the kernel's interface); identical masks share one
    # block table. head_shards=1: each shard_map shard sees only its own heads.
    return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([mask] * num_heads), block_sizes=blocks,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
              causal: bool, scale: float | None = None) -> jax.Array:
    """Splash attention with the contract of `model.attention`.

    q: [B, T, N, H]; k, v: [B, S, G, H]; segment_ids: [B, T] int (T == S) or None.
    Tokens attend only to keys of their own segment (0 is an ordinary id: padding
    attends to padding, never to real tokens) and, if `causal`, to earlier slots.
    scale: default 1/sqrt(H). Returns [B, T, N, H] in q's dtype."""
    B, T, N, H = q.shape
    S, G = k.shape[1], k.shape[2]
    platform = target_platform()
    reason = unsupported_reason(T, S, q.dtype, platform=platform)
    if reason is None and segment_ids is not None and (T != S or segment_ids.shape != (B, T)):
        reason = f"segment_ids {segment_ids.shape} need self-attention over [B, T] = {(B, T)} (keys {S})"
    if reason is not None:
        raise ConfigError(f"model.attention_impl='splash': {reason}")
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    # The kernel does not scale the scores: scale q once, in float32, rounding once
    # to q's dtype (exact when H is a power of 4, e.g. 64).
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    interpret = platform != "tpu"

    def run(q, k, v, *seg):  # one device: [b, T, n, H], [b, S, g, H], ([b, T])
        kernel = _kernel(q.shape[2], T, S, causal, interpret)
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [b, T, n, H] <-> [b, n, T, H]
        if seg:
            ids = seg[0].astype(jnp.int32)
            out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(s, s)))(
                heads_first(q), heads_first(k), heads_first(v), ids)
        else:
            out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v))
        return heads_first(out)

    args = (q, k, v) if segment_ids is None else (q, k, v, segment_ids)
    mesh = _active_mesh()
    if mesh is None:
        return run(*args)
    # Split what divides evenly: batch over data x fsdp, heads over tensor (the
    # q/k/v projections are already split that way, so no data moves). A batch or
    # head count that does not divide (one prompt, a config the mesh checks did
    # not see) is replicated on that axis instead.
    batch = BATCH if B % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
    t = mesh.shape["tensor"]
    heads = "tensor" if N % t == 0 and G % t == 0 else None
    qkv_spec = P(batch, None, heads, None)
    specs = (qkv_spec,) * 3 + ((P(batch, None),) if segment_ids is not None else ())
    # check_vma=False: pallas_call does not declare how its outputs vary across
    # the manual axes; every output block depends only on its own shard's inputs.
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(*args)
