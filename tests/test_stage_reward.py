"""Reward model: rewards read at the right token, the Bradley-Terry loss, learning.

The reference reward of a sequence is computed with the sequence alone in a
row, right-padded, with plain causal attention (no segment ids): the hidden
state at its last token cannot see the padding after it. The head is applied
in numpy. Packed batches and `score_sequences` must agree with it.
"""

import dataclasses
import random

import jax
import numpy as np
import pytest

from llm_jax import model, sharding, train
from llm_jax.config import MeshConfig, OptimizerConfig, preset
from llm_jax.data import formats, packing, preferences
from llm_jax.data.loader import DataConfig, Loader
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.stages import reward

TOK = ByteTokenizer()
CFG = preset("tiny", vocab_size=TOK.vocab_size, max_len=128)
SEQ, S = 128, 4


@pytest.fixture(scope="module")
def params():
    p = reward.init_reward_params(CFG, model.init(CFG, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    # A larger head than init gives O(1) rewards, so the loss is not ~log 2 everywhere.
    return {**p, "head": {"kernel": p["head"]["kernel"] * 50.0, "bias": np.float32(0.3)}}


@jax.jit
def _hidden(lm_params, tokens):
    return model.forward(CFG, lm_params, tokens)


def reference_rewards(params, token_lists):
    """Each sequence alone, causal, read at its own last token; head in numpy."""
    tokens = np.zeros((len(token_lists), SEQ), np.int32)
    for i, t in enumerate(token_lists):
        tokens[i, :len(t)] = t
    hidden = np.asarray(_hidden(params["model"], tokens), np.float64)
    last = hidden[np.arange(len(token_lists)), [len(t) - 1 for t in token_lists]]  # [N, D]
    return last @ np.asarray(params["head"]["kernel"], np.float64) + float(params["head"]["bias"])


def segments(batch, prefix):
    """{(row, seg index): input tokens} of every sequence in a packed set."""
    seg_ids = batch[prefix + "segment_ids"]
    return {(r, s - 1): list(batch[prefix + "inputs"][r][seg_ids[r] == s])
            for r in range(seg_ids.shape[0]) for s in range(1, seg_ids[r].max() + 1)}


def test_packed_and_scored_rewards_match_each_sequence_alone(params):
    rng = random.Random(0)
    records = [preferences.preference_record(rng, "train", ("correct", "polite")) for _ in range(7)]
    pairs = [formats.to_examples(r, "preferences", TOK, SEQ)[0][0] for r in records]
    batch, places = packing.pack_examples(pairs, SEQ, max_segments=S)
    assert batch["chosen_segment_ids"].max() >= 2  # some rows really hold several sequences

    rewards = jax.jit(reward.sequence_rewards, static_argnums=(0, 5))
    for prefix, field in (("chosen_", "chosen"), ("rejected_", "rejected")):
        packed = np.asarray(rewards(CFG, params, batch[prefix + "inputs"], batch[prefix + "positions"],
                                    batch[prefix + "segment_ids"], S))
        # The convention: prompt tokens + response tokens, no eos (the eos is a target).
        full = [formats.prompt_tokens(TOK, r["prompt"]) + TOK.encode(r[field]) for r in records]
        want = reference_rewards(params, full)
        assert np.abs(want).max() > 0.5
        got = np.array([packed[row, seg - 1] for row, seg in places])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(reward.score_sequences(CFG, params, full), want, rtol=1e-5, atol=1e-5)
        # Slots without a sequence read 0.
        assert (packed[batch["pair_mask"] == 0] == 0).all()


@jax.jit
def _logits(lm_params, tokens):
    return model.apply(CFG, lm_params, tokens)


def reference_likelihood_rewards(params, prompts, responses):
    """Head at the last token + lm_scale x mean log p over the response's tokens and
    its eos, each sequence alone; log-softmax in numpy, float64."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    head = reference_rewards(params, seqs)
    tokens = np.zeros((len(seqs), SEQ), np.int32)
    for i, t in enumerate(seqs):
        tokens[i, :len(t)] = t
    logits = np.asarray(_logits(params["model"], tokens), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    means = [np.mean([logp[i, len(p) - 1 + t, y] for t, y in enumerate(r + [TOK.eos_id])])
             for i, (p, r) in enumerate(zip(prompts, responses))]
    return head + float(params["lm_scale"]) * np.array(means)


def test_likelihood_reward_model_in_packed_batches_scoring_and_loss(params):
    lik = dict(params, lm_scale=np.float32(0.8))
    rng = random.Random(1)
    records = [preferences.preference_record(rng, "train") for _ in range(7)]
    pairs = [formats.to_examples(r, "preferences", TOK, SEQ)[0][0] for r in records]
    batch, places = packing.pack_examples(pairs, SEQ, max_segments=S)
    prompts = [formats.prompt_tokens(TOK, r["prompt"]) for r in records]
    want = {}
    for side in ("chosen", "rejected"):
        responses = [TOK.encode(r[side]) for r in records]
        want[side] = reference_likelihood_rewards(lik, prompts, responses)
        assert np.abs(want[side] - reference_rewards(lik, [p + r for p, r in zip(prompts, responses)])).min() > 0.05
        scored = reward.score_sequences(CFG, lik, [p + r for p, r in zip(prompts, responses)],
                                        response_starts=[len(p) for p in prompts], eos_id=TOK.eos_id)
        np.testing.assert_allclose(scored, want[side], rtol=1e-5, atol=1e-5)
    loss, _ = jax.jit(reward.rm_loss_fn(CFG, S))(lik, batch, None, reward.pair_count(batch))
    for side, packed in zip(("chosen", "rejected"), reward._pair_rewards(CFG, lik, batch, S)):
        got = np.array([np.asarray(packed)[row, seg - 1] for row, seg in places])
        np.testing.assert_allclose(got, want[side], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, np_bt_loss(want["chosen"], want["rejected"]).mean(), rtol=1e-5)
    # the scale is learned: the loss has a gradient with respect to it
    grads = jax.grad(lambda q: reward.rm_loss_fn(CFG, S)(q, batch, None, reward.pair_count(batch))[0])(lik)
    assert abs(float(grads["lm_scale"])) > 1e-4
    with pytest.raises(ValueError, match="response_starts and eos_id"):
        reward.score_sequences(CFG, lik, [prompts[0] + [70]])
    with pytest.raises(ValueError, match="needs targets and weights"):
        reward.sequence_rewards(CFG, lik, batch["chosen_inputs"], None, batch["chosen_segment_ids"], S)
    assert set(reward.init_reward_params(CFG, lik["model"], jax.random.PRNGKey(0), likelihood=True)) == {
        "model", "head", "lm_scale"}


def np_bt_loss(chosen, rejected, margin=0.0):
    return np.logaddexp(0.0, -(chosen - rejected - margin))  # -log sigmoid(x)


@pytest.mark.parametrize("margin", [None, 0.5])
def test_loss_and_metrics_match_numpy_over_real_pairs_only(params, margin):
    cfg = DataConfig(source="builtin:preferences", seq_len=SEQ, batch_size=4, size=50, max_segments=S)
    batch = next(Loader(cfg, TOK, shard_index=0, shard_count=1))
    mask = batch["pair_mask"]
    assert (mask == 0).any() and (mask == 1).any()  # padding slots exist and must not count
    chosen, rejected = (segments(batch, p) for p in ("chosen_", "rejected_"))
    keys = sorted(chosen)
    assert keys == sorted(zip(*np.nonzero(mask)))
    c = reference_rewards(params, [chosen[k] for k in keys])
    r = reference_rewards(params, [rejected[k] for k in keys])

    norm = reward.pair_count(batch)
    assert float(norm) == len(keys)
    loss_fn = jax.jit(reward.rm_loss_fn(CFG, S, margin=margin))
    loss, m = loss_fn(params, batch, None, norm)
    np.testing.assert_allclose(loss, np_bt_loss(c, r, margin or 0.0).mean(), rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], np.mean(c > r), rtol=1e-6)
    np.testing.assert_allclose(m["margin"], np.mean(c - r), rtol=1e-5, atol=1e-6)

    correct, count = reward.pairwise_accuracy(CFG, params, batch, S)
    assert (float(correct), float(count)) == (float(np.sum(c > r)), len(keys))


def test_bad_inputs_are_refused(params):
    cfg = DataConfig(source="builtin:preferences", seq_len=SEQ, batch_size=2, size=20, max_segments=S)
    batch = next(Loader(cfg, TOK, shard_index=0, shard_count=1))
    with pytest.raises(ValueError, match="max_segments=3"):
        reward.rm_loss_fn(CFG, 3)(params, batch, None, 1.0)
    with pytest.raises(ValueError, match="non-empty"):
        reward.score_sequences(CFG, params, [[1, 4, 10], []])


def test_training_on_builtin_preferences_beats_chance_on_held_out_pairs():
    data = DataConfig(source="builtin:preferences", seq_len=SEQ, batch_size=8, size=400, max_segments=S)
    held_out = DataConfig(source="builtin:preferences", split="eval", seq_len=SEQ, batch_size=16, size=400,
                          max_segments=S, shuffle=False, num_epochs=1)
    eval_loader = Loader(held_out, TOK, shard_index=0, shard_count=1)
    eval_batches = [next(eval_loader) for _ in range(3)]
    accuracy = jax.jit(reward.pairwise_accuracy, static_argnums=(0, 3))

    def evaluate(p):
        counts = np.array([[float(x) for x in accuracy(CFG, p, b, S)] for b in eval_batches]).sum(0)
        return counts[0] / counts[1]

    steps = 40
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx, schedule = train.make_optimizer(OptimizerConfig(lr=3e-3, warmup_steps=5), steps)
    init = lambda r: reward.init_reward_params(CFG, model.init(CFG, r), jax.random.fold_in(r, 1))  # noqa: E731
    state, shardings = train.create_train_state(init, tx, mesh, seed=0)
    step = train.jit_train_step(train.make_train_step(reward.rm_loss_fn(CFG, S), reward.pair_count, tx,
                                                      schedule), mesh, shardings)
    before = evaluate(state.params)
    loader = Loader(data, TOK, shard_index=0, shard_count=1)
    for _ in range(steps):
        state, metrics = step(state, sharding.shard_batch(next(loader), mesh))
    after = evaluate(state.params)
    # Measured with the init, state seed and data seed of seeds 0-4 (seed 0 is this test),
    # on these 67 held-out pairs: after 0.806, 0.851, 0.851, 0.836, 0.821 (0.7 is 7 pairs
    # below the lowest); before (a random head, on either side of chance) 0.164, 0.701,
    # 0.209, 0.239, 0.687, so the gain was 0.64, 0.15, 0.64, 0.60, 0.13: the former
    # "before + 0.2" failed for seeds 1 and 4. It is now + 0.05 (margin 0.08, 5 pairs).
    assert after >= 0.7 and after > before + 0.05, (before, after)


def test_pairwise_accuracy_by_kind_matches_each_pair_scored_alone(params):
    from llm_jax import evals
    from llm_jax.data import builtin

    records = evals.preference_records(60, seed=3)
    assert all(builtin.bucket(f"{r['kind']}|{r['prompt']}") == "eval" for r in records)
    fits = lambda r: max(len(formats.prompt_tokens(TOK, r["prompt"]) + TOK.encode(r[f]))  # noqa: E731
                         for f in ("chosen", "rejected")) <= SEQ
    records = [r for r in records if fits(r)][:40]
    got = evals.pairwise_accuracy_by_kind(CFG, params, TOK, records, batch_size=16)
    full = lambda field: [formats.prompt_tokens(TOK, r["prompt"]) + TOK.encode(r[field]) for r in records]  # noqa: E731
    right = reference_rewards(params, full("chosen")) > reference_rewards(params, full("rejected"))
    assert 0.0 < right.mean() < 1.0  # a random head ranks some pairs right and some wrong
    assert got["accuracy"] == pytest.approx(right.mean()) and got["pairs"] == 40 and got["skipped"] == 0
    for kind in preferences.PREFERENCE_KINDS:
        mine = [ok for r, ok in zip(records, right) if r["kind"] == kind]
        assert got["by_kind"][kind] == pytest.approx(np.mean(mine)) and got["pairs_by_kind"][kind] == len(mine)
    tasks = {r["task"] for r in records if r["kind"] == "correct"}
    assert set(got["by_task"]) == tasks
    short = evals.pairwise_accuracy_by_kind(dataclasses.replace(CFG, max_len=40), params, TOK, records)
    assert short["skipped"] > 0 and short["pairs"] + short["skipped"] == 40
    with pytest.raises(ValueError, match="no records"):
        evals.pairwise_accuracy_by_kind(CFG, params, TOK, [])
