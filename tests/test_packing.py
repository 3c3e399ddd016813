"""Packing: a packed row scores each sequence exactly as it would alone."""

import jax
import numpy as np
import pytest

from llm_jax import losses, model
from llm_jax.config import preset
from llm_jax.data.packing import pack_clm, packing_efficiency

CFG = preset("tiny")


def test_packed_equals_unpacked_per_sequence():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(6, 200, n)) for n in (9, 5, 12, 3, 7)]
    packed = pack_clm(seqs, seq_len=16)
    assert packed["inputs"].shape[1] == 16
    params = model.init(CFG, jax.random.PRNGKey(0))
    logits = model.apply(CFG, params, packed["inputs"], positions=packed["positions"],
                         segment_ids=packed["segment_ids"])
    lp = np.asarray(losses.token_logprobs(logits, packed["targets"])) * packed["weights"]
    # each segment's summed log-prob, matched to its sequence by its tokens (rows are filled first-fit)
    got = [0.0] * len(seqs)
    for r in range(len(lp)):
        for s in range(1, packed["segment_ids"][r].max() + 1):
            tokens = list(packed["inputs"][r][packed["segment_ids"][r] == s])
            got[[list(q[:-1]) for q in seqs].index(tokens)] = lp[r][packed["segment_ids"][r] == s].sum()
    # reference: every sequence alone in its own row (right-padded, no segment ids), one call
    width = max(len(q) for q in seqs) - 1
    alone = np.zeros((len(seqs), width + 1), np.int32)
    for i, q in enumerate(seqs):
        alone[i, :len(q)] = q
    lp_alone = np.asarray(losses.token_logprobs(model.apply(CFG, params, alone[:, :-1]), alone[:, 1:]))
    want = [lp_alone[i, :len(q) - 1].sum() for i, q in enumerate(seqs)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert packing_efficiency(packed) == pytest.approx(sum(len(s) - 1 for s in seqs) / packed["weights"].size)


def test_long_sequences_are_truncated_and_singletons_dropped():
    packed = pack_clm([[1] * 40, [2]], seq_len=16)
    assert packed["inputs"].shape == (1, 16) and packed["weights"].sum() == 16
