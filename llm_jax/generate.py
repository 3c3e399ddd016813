"""Sampling with a KV cache: greedy, temperature, top-k, top-p, batched.

Prompts of different lengths are left-padded so every row's next token lands in
the same cache slot; padding carries segment 0 (never attended to) and positions
count from each row's first real token, so a padded row decodes exactly as it
would alone. The whole decode loop is one `lax.scan` inside one jit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import model
from llm_jax.config import ModelConfig


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens [B, P] and a 0/1 real-token mask [B, P]."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return tokens, mask


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """[B, V] float32 -> logits with everything outside top-k / the top-p nucleus at -inf."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest set whose mass reaches top_p (always at least the top token)
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "use_cache"))
def _sample(config: ModelConfig, params, tokens, mask, rng, *, max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, eos_id: int, use_cache: bool = True):
    B, P = tokens.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    next_pos = positions[:, -1] + 1  # [B]

    def pick(logits, key):
        if temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)

    keys = jax.random.split(rng, max_new_tokens)
    if use_cache:
        cache = model.init_cache(config, B, P + max_new_tokens)
        logits, cache = model.apply_with_cache(config, params, tokens, cache, positions=positions,
                                               segment_ids=mask)
        first = pick(logits[:, -1], keys[0])

        def step(carry, key):
            cache, tok, pos, done = carry
            logits, cache = model.apply_with_cache(config, params, tok[:, None], cache,
                                                   positions=pos[:, None],
                                                   segment_ids=jnp.ones((B, 1), jnp.int32))
            new = pick(logits[:, -1], key)
            new = jnp.where(done, eos_id, new)
            return (cache, new, pos + 1, done | (new == eos_id)), new

        carry = (cache, first, next_pos, first == eos_id)
        _, rest = jax.lax.scan(step, carry, keys[1:])
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    # Without a cache: re-run the whole (growing, fixed-size) buffer every step.
    # Only for benchmarks/tests of the cache; O(T^2) work.
    buf = jnp.concatenate([tokens, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    seg = jnp.concatenate([mask, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    pos = jnp.concatenate([positions, next_pos[:, None] + jnp.arange(max_new_tokens)], axis=1)

    def step_nocache(carry, xs):
        buf, seg, done = carry
        i, key = xs
        logits = model.apply(config, params, buf, positions=pos, segment_ids=seg)
        last = jax.lax.dynamic_index_in_dim(logits, P + i - 1, axis=1, keepdims=False)
        new = jnp.where(done, eos_id, pick(last, key))
        buf = jax.lax.dynamic_update_index_in_dim(buf, new, P + i, axis=1)
        seg = jax.lax.dynamic_update_index_in_dim(seg, jnp.ones((B,), jnp.int32), P + i, axis=1)
        return (buf, seg, done | (new == eos_id)), new

    _, out = jax.lax.scan(step_nocache, (buf, seg, jnp.zeros((B,), bool)),
                          (jnp.arange(max_new_tokens), keys))
    return out.T


def generate(config: ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int,
             rng: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_id: int = -1, pad_id: int = 0,
             use_cache: bool = True) -> list[list[int]]:
    """Continues each prompt by up to `max_new_tokens` tokens (stopping at eos_id).

    temperature 0 is greedy. Returns the new tokens per prompt, eos excluded."""
    if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if config.positions == "learned" and longest > config.max_len:
        raise ValueError(f"prompt + max_new_tokens = {longest} exceeds model.max_len={config.max_len}")
    tokens, mask = left_pad(prompts, pad_id)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    out = np.asarray(_sample(config, params, jnp.asarray(tokens), jnp.asarray(mask), rng,
                             max_new_tokens=max_new_tokens, temperature=float(temperature),
                             top_k=int(top_k), top_p=float(top_p), eos_id=int(eos_id),
                             use_cache=use_cache))
    results = []
    for row in out.tolist():
        results.append(row[: row.index(eos_id)] if eos_id in row else row)
    return results
