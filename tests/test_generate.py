"""Sampling: the KV-cache sampler against cache-free reference decodes.

Expected tokens never come from `generate` itself. They come from decoding each
prompt alone, with no padding and no cache, by re-running a full forward pass
on the growing sequence (`reference_model.decode`): through the float64 numpy
reference model of tests/reference_model.py, and through llm_jax's own full
forward (`model.apply`, no cache). Sampled tokens use the same keys the sampler
documents (`jax.random.split(rng, max_new_tokens)`, one per step) with
`jax.random.categorical` on the reference's logits.

Weights: `reference_model.random_params`, under which the greedy next token
depends on the context (asserted below). At init's weights a tied-embedding
model's greedy next token is its current token at every position, so a broken
cache, padding or position scheme decodes the same `[last] * n` as a correct one.
"""

import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import generate, model
from llm_jax.config import preset
from llm_jax.errors import InputError

TESTS = pathlib.Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
import reference_model as ref  # noqa: E402

CONFIGS = {
    # rotary, GQA 4/2, RMSNorm, SwiGLU, tied embeddings. RoPE scores depend only on
    # relative positions, so this one cannot see positions shifted by the padding...
    "rotary-tied": preset("tiny"),
    # ...absolute learned positions can (and the untied head, LayerNorm, GELU, biases).
    "learned-untied": dataclasses.replace(preset("tiny"), positions="learned", norm="layernorm",
                                          mlp="gelu", use_bias=True, tie_embeddings=False),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]  # ragged: rows 2 and 3 are left-padded
NEW = 8
WIDTH = 16  # >= longest prompt + NEW: the full-forward reference's one compiled shape


@functools.lru_cache(maxsize=None)
def weights(name):
    cfg = CONFIGS[name]
    shapes = jax.eval_shape(lambda: model.init(cfg, jax.random.PRNGKey(0)))
    return cfg, jax.tree.map(jnp.asarray, ref.random_params(shapes, seed=3))


@functools.lru_cache(maxsize=None)
def full_forward(name):
    """seq -> logits [V] at its last token: llm_jax's full forward, no cache, no
    left padding. The sequence is right-filled to WIDTH so one program serves every
    length; a causal model's logits at a position never see the tokens after it."""
    cfg, params = weights(name)
    apply = jax.jit(functools.partial(model.apply, cfg))

    def last_logits(seq):
        buf = np.zeros((1, WIDTH), np.int32)
        buf[0, :len(seq)] = seq
        return np.asarray(apply(params, buf), np.float64)[0, len(seq) - 1]
    return last_logits


@functools.lru_cache(maxsize=None)
def reference_greedy(name, eos_id=-1):
    cfg, params = weights(name)
    return ref.decode(cfg, params, PROMPTS, NEW, eos_id=eos_id)


def categorical_pick(rng, temperature, top_k=0):
    """The sampler's documented draw: step i samples every row with key i of
    split(rng, NEW), from softmax(logits / temperature) (top-k: all but the k
    largest logits of a row removed, by numpy)."""
    keys = jax.random.split(rng, NEW)

    def pick(step, logits):
        z = np.asarray(logits, np.float64) / temperature
        if top_k:
            kth = np.sort(z, axis=-1)[:, -top_k][:, None]
            z = np.where(z >= kth, z, -np.inf)
        return [int(t) for t in np.asarray(jax.random.categorical(keys[step], jnp.asarray(z, jnp.float32)))]
    return pick


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_cached_batch_equals_reference_decodes(name):
    cfg, params = weights(name)
    want = reference_greedy(name)
    # The weights decide the test: the greedy continuation follows the context,
    # not the current token (as it would at init's weights).
    repeats = sum(t == prev for p, out in zip(PROMPTS, want) for prev, t in zip([p[-1]] + out, out))
    assert repeats <= len(PROMPTS) * NEW // 4, want
    assert len({t for out in want for t in out}) >= NEW, want
    # llm_jax's full forward (float32, no cache) decodes as the float64 reference does.
    assert ref.decode(cfg, params, PROMPTS, NEW, last_logits=full_forward(name)) == want
    # The sampler: one left-padded batch of ragged prompts, KV cache (and without).
    assert generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW) == want
    assert generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, use_cache=False) == want


@pytest.mark.parametrize("name", CONFIGS)
def test_temperature_sampling_equals_reference_sampler(name):
    cfg, params = weights(name)
    rng = jax.random.PRNGKey(7)
    want = ref.decode(cfg, params, PROMPTS, NEW, pick=categorical_pick(rng, 0.8),
                      last_logits=full_forward(name))
    assert want != reference_greedy(name)  # sampling, not greedy
    kw = dict(max_new_tokens=NEW, temperature=0.8, rng=rng)
    assert generate.generate(cfg, params, PROMPTS, **kw) == want
    assert generate.generate(cfg, params, PROMPTS, use_cache=False, **kw) == want


def test_top_k_and_top_p():
    name = "learned-untied"
    cfg, params = weights(name)
    rng = jax.random.PRNGKey(3)
    kw = dict(max_new_tokens=NEW, temperature=1.0, rng=rng)
    greedy = reference_greedy(name)
    assert ref.decode(cfg, params, PROMPTS, NEW, pick=categorical_pick(rng, 1.0),
                      last_logits=full_forward(name)) != greedy  # unfiltered samples differ
    assert generate.generate(cfg, params, PROMPTS, top_k=1, **kw) == greedy
    assert generate.generate(cfg, params, PROMPTS, top_p=1e-6, **kw) == greedy
    want = ref.decode(cfg, params, PROMPTS, NEW, pick=categorical_pick(rng, 1.0, top_k=3),
                      last_logits=full_forward(name))
    assert want != greedy
    assert generate.generate(cfg, params, PROMPTS, top_k=3, **kw) == want


def test_filter_logits_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32)
    out = np.asarray(generate.filter_logits(logits, 0.7, 5, 1.0))
    for row, o in zip(logits / 0.7, out):
        keep = np.argsort(row)[::-1][:5]
        assert set(np.flatnonzero(np.isfinite(o))) == set(keep)
    out = np.asarray(generate.filter_logits(logits, 1.0, 0, 0.8))
    for row, o in zip(logits, out):
        p = np.exp(row - row.max())
        p /= p.sum()
        order = np.argsort(p)[::-1]
        n = int(np.searchsorted(np.cumsum(p[order]), 0.8) + 1)  # smallest set with mass >= 0.8
        assert set(np.flatnonzero(np.isfinite(o))) == set(order[:n])


def test_stops_at_eos_and_validates_settings():
    name = "rotary-tied"
    cfg, params = weights(name)
    full = reference_greedy(name)[0]
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])  # a token first made at step k
    want = reference_greedy(name, eos_id=full[k])
    assert want[0] == full[:k] and want != reference_greedy(name)
    assert generate.generate(cfg, params, PROMPTS, max_new_tokens=NEW, eos_id=full[k]) == want
    with pytest.raises(InputError, match="top_p"):
        generate.generate(cfg, params, PROMPTS, max_new_tokens=2, top_p=0.0)
    with pytest.raises(InputError, match="at least one token"):
        generate.generate(cfg, params, [[]], max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens=0: must be at least 1"):
        generate.generate(cfg, params, PROMPTS, max_new_tokens=0)
