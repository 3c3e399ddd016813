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
    # reassemble each sequence's summed log-prob from the packed rows, in packing order
    got = []
    for r in range(len(lp)):
        for s in range(1, packed["segment_ids"][r].max() + 1):
            got.append(lp[r][packed["segment_ids"][r] == s].sum())
    want = []
    for seq in seqs:
        x = np.array([seq], np.int32)
        alone = model.apply(CFG, params, x[:, :-1])
        want.append(float(np.sum(losses.token_logprobs(alone, x[:, 1:]))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert packing_efficiency(packed) == pytest.approx(sum(len(s) - 1 for s in seqs) / packed["weights"].size)


def test_long_sequences_are_truncated_and_singletons_dropped():
    packed = pack_clm([[1] * 40, [2]], seq_len=16)
    assert packed["inputs"].shape == (1, 16) and packed["weights"].sum() == 16
