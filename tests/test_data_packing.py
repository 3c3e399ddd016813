"""llm_jax.data.packing: a packed row (pretraining, SFT, preference pairs) scores
every sequence exactly as it scores alone.

Other stacks shipped bugs here (prompt masks leaking across packed boundaries),
so the reference is independent of the packer: each sequence is cut out of the
packed row by its segment id, run alone (right-padded, no segment ids, default
positions), and its loss weights are recomputed from the raw tokens (weight on
every target after the <response> token).
"""

import jax
import numpy as np
import pytest

from llm_jax import losses, model
from llm_jax.config import preset
from llm_jax.data.loader import DataConfig, Loader
from llm_jax.data.packing import pack_clm, packing_efficiency, segment_mask, sequence_scores
from llm_jax.data.tokenizer import RESPONSE_ID, ByteTokenizer

TOK = ByteTokenizer()
CFG = preset("tiny", vocab_size=TOK.vocab_size)
SEQ = 64
MAX_SEG = 16


def test_sequence_scores_matches_a_loop():
    rng = np.random.default_rng(0)
    seg = np.sort(rng.integers(0, 5, (3, 20)), axis=1)
    vals = rng.normal(size=(3, 20)).astype(np.float32)
    got = np.asarray(sequence_scores(vals, seg, 6))
    want = np.zeros((3, 6), np.float32)
    for r in range(3):
        for t in range(20):
            if seg[r, t] > 0:
                want[r, seg[r, t] - 1] += vals[r, t]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    present = np.array([[float((seg[r] == s + 1).any()) for s in range(6)] for r in range(3)])
    np.testing.assert_array_equal(np.asarray(segment_mask(seg, 6)), present)


def _cut(batch, prefix=""):
    """[(row, segment, full token sequence)] of every packed sequence."""
    out = []
    for r, seg in enumerate(batch[prefix + "segment_ids"]):
        for s in range(1, seg.max() + 1):
            m = seg == s
            tokens = [*batch[prefix + "inputs"][r][m], batch[prefix + "targets"][r][m][-1]]
            out.append((r, s, tokens))
    return out


def _alone(params, seqs):
    """Per-sequence (weighted log-prob sum, weighted token log-probs, weights), each run alone."""
    x = np.zeros((len(seqs), SEQ + 1), np.int32)
    w = np.zeros((len(seqs), SEQ), np.float32)
    for i, q in enumerate(seqs):
        x[i, :len(q)] = q
        start = q.index(RESPONSE_ID) if RESPONSE_ID in q else 0  # targets after <response> are scored
        w[i, start:len(q) - 1] = 1.0
    lp = np.asarray(losses.token_logprobs(model.apply(CFG, params, x[:, :-1]), x[:, 1:]))
    return (lp * w).sum(1), lp * w, w


def _packed_logprobs(params, batch, prefix=""):
    logits = model.apply(CFG, params, batch[prefix + "inputs"], positions=batch[prefix + "positions"],
                         segment_ids=batch[prefix + "segment_ids"])
    return logits, losses.token_logprobs(logits, batch[prefix + "targets"])


def test_packed_sft_batch_equals_unpacked():
    params = model.init(CFG, jax.random.PRNGKey(0))
    ld = Loader(DataConfig(source="builtin:sft", seq_len=SEQ, batch_size=4, max_segments=MAX_SEG),
                TOK, shard_index=0, shard_count=1)
    b = next(ld)
    cut = _cut(b)
    assert len(cut) > len(b["inputs"])  # several sequences share rows
    want_sum, want_lp, want_w = _alone(params, [q for _, _, q in cut])
    # the packed weights are exactly the recomputed completion-only weights: no leak across boundaries
    for i, (r, s, q) in enumerate(cut):
        np.testing.assert_array_equal(b["weights"][r][b["segment_ids"][r] == s], want_w[i, :len(q) - 1])
    assert b["weights"][b["segment_ids"] == 0].sum() == 0
    logits, lp = _packed_logprobs(params, b)
    per_seq = np.asarray(sequence_scores(lp * b["weights"], b["segment_ids"], MAX_SEG))
    got = [per_seq[r, s - 1] for r, s, _ in cut]
    np.testing.assert_allclose(got, want_sum, rtol=1e-5, atol=1e-5)
    # the SFT loss of the packed batch = token-weighted mean over the sequences run alone
    loss = float(losses.sft_loss(logits, b["targets"], b["weights"]))
    np.testing.assert_allclose(loss, -want_lp.sum() / want_w.sum(), rtol=1e-5)


def test_packed_preference_pairs_line_up_and_equal_unpacked():
    params = model.init(CFG, jax.random.PRNGKey(1))
    ld = Loader(DataConfig(source="builtin:preferences", seq_len=SEQ, batch_size=4, max_segments=MAX_SEG),
                TOK, shard_index=0, shard_count=1)
    b = next(ld)
    chosen, rejected = _cut(b, "chosen_"), _cut(b, "rejected_")
    assert [(r, s) for r, s, _ in chosen] == [(r, s) for r, s, _ in rejected]  # pair k: same (row, segment)
    for (_, _, c), (_, _, j) in zip(chosen, rejected):  # ... and the same prompt
        assert c[:c.index(RESPONSE_ID) + 1] == j[:j.index(RESPONSE_ID) + 1] and c != j
    np.testing.assert_array_equal(b["pair_mask"], np.asarray(segment_mask(b["chosen_segment_ids"], MAX_SEG)))
    assert b["pair_mask"].sum() == len(chosen) > len(b["chosen_inputs"])
    seqs = [q for _, _, q in chosen] + [q for _, _, q in rejected]
    want, _, _ = _alone(params, seqs)
    got = []
    for prefix in ("chosen_", "rejected_"):
        _, lp = _packed_logprobs(params, b, prefix)
        scores = np.asarray(sequence_scores(lp * b[prefix + "weights"], b[prefix + "segment_ids"], MAX_SEG))
        got += [scores[r, s - 1] for r, s, _ in chosen]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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
