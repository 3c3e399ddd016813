"""Sampling: the KV-cache loop against a cache-free reference and numpy filters."""

import jax
import numpy as np
import pytest

from llm_jax import generate, model
from llm_jax.config import preset

CFG = preset("tiny")
PARAMS = model.init(CFG, jax.random.PRNGKey(0))
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]


def greedy_reference(prompt, n):
    """Greedy decoding by re-running the full forward pass on the growing sequence."""
    seq = list(prompt)
    for _ in range(n):
        logits = model.apply(CFG, PARAMS, np.array([seq], np.int32))
        seq.append(int(np.argmax(logits[0, -1])))
    return seq[len(prompt):]


def test_greedy_cached_batch_equals_full_forward_one_by_one():
    got = generate.generate(CFG, PARAMS, PROMPTS, max_new_tokens=6)
    for prompt, out in zip(PROMPTS, got):
        assert out == greedy_reference(prompt, 6)


def test_cache_and_no_cache_sample_the_same_tokens():
    kw = dict(max_new_tokens=6, temperature=1.0, rng=jax.random.PRNGKey(7))
    assert (generate.generate(CFG, PARAMS, PROMPTS, **kw)
            == generate.generate(CFG, PARAMS, PROMPTS, use_cache=False, **kw))


def test_top_k_one_and_tiny_top_p_are_greedy():
    greedy = generate.generate(CFG, PARAMS, PROMPTS, max_new_tokens=5)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        assert generate.generate(CFG, PARAMS, PROMPTS, max_new_tokens=5, temperature=1.0,
                                 rng=jax.random.PRNGKey(3), **kw) == greedy


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
    kw = dict(max_new_tokens=8, temperature=1.0, rng=jax.random.PRNGKey(1))
    full = generate.generate(CFG, PARAMS, [PROMPTS[0]], **kw)[0]
    k = next(i for i in range(1, len(full)) if full[i] not in full[:i])  # first new token after the start
    assert generate.generate(CFG, PARAMS, [PROMPTS[0]], eos_id=full[k], **kw)[0] == full[:k]
    with pytest.raises(ValueError, match="top_p"):
        generate.generate(CFG, PARAMS, PROMPTS, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate.generate(CFG, PARAMS, [[]], max_new_tokens=2)
