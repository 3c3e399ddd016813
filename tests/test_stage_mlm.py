"""Masked-LM stage: masking statistics, loss vs numpy, exact resume, and learning.

References: masking rates are counted directly from the tokens (seed 003: 15% of
positions, of those 80% [MASK], 10% random, 10% unchanged); the loss and
accuracy are a float64 numpy log-softmax / argmax of the encoder's logits.
"""

import json

import jax
import numpy as np
import pytest

from llm_jax import loop, model, sharding, train
from llm_jax.config import ConfigError, MeshConfig, OptimizerConfig, preset
from llm_jax.data.errors import DataError
from llm_jax.data.loader import DataConfig, Loader, ShardedLoader
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.stages import mlm

TOK = ByteTokenizer()
CFG = preset("tiny", vocab_size=TOK.vocab_size, causal=False)


class ArrayLoader:
    """A stand-in pretraining loader: the same given batch every time, counting calls."""

    def __init__(self, batch):
        self.batch, self.n = batch, 0

    def __next__(self):
        self.n += 1
        return self.batch

    def get_state(self):
        return {"n": self.n}

    def set_state(self, state):
        self.n = state["n"]


def masking(loader, seed=0, mask_prob=0.15):
    return mlm.MaskingLoader(loader, mask_id=TOK.mask_id, vocab_size=TOK.vocab_size, mask_prob=mask_prob,
                             seed=seed)


def builtin_loader(split="train", rows=8, seq_len=64, shards=None, **kw):
    cfg = DataConfig(source="builtin:pretrain", split=split, seq_len=seq_len, batch_size=rows, size=200, **kw)
    if shards is None:
        return Loader(cfg, TOK, shard_index=0, shard_count=1)
    return ShardedLoader(cfg, TOK, shards)


def test_masking_statistics_on_a_large_batch():
    rng = np.random.default_rng(0)
    rows, seq_len = 64, 512
    tokens = rng.integers(0, TOK.vocab_size, (rows, seq_len)).astype(np.int32)  # specials included
    lengths = rng.integers(seq_len // 2, seq_len + 1, rows)
    segments = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)  # padding at the end
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1), "weights": segments.astype(np.float32),
             "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)), "segment_ids": segments}
    out = next(masking(ArrayLoader(batch)))

    maskable = (segments > 0) & (tokens >= TOK.num_special)
    chosen = out["weights"] > 0
    assert set(np.unique(out["weights"])) == {0.0, 1.0}
    assert not chosen[~maskable].any()  # padding and special tokens are never chosen
    np.testing.assert_array_equal(out["targets"], tokens)  # targets: the original tokens
    np.testing.assert_array_equal(out["inputs"][~chosen], tokens[~chosen])  # unchosen: unchanged
    np.testing.assert_array_equal(out["positions"], batch["positions"])
    np.testing.assert_array_equal(out["segment_ids"], segments)

    n_maskable, n_chosen = maskable.sum(), chosen.sum()
    assert n_maskable > 10_000
    # Binomial standard errors: 0.15 over ~14k -> 0.003; 0.8/0.1 over ~2k -> 0.009/0.007.
    assert abs(n_chosen / n_maskable - 0.15) < 0.01
    x, y = out["inputs"][chosen], tokens[chosen]
    as_mask = np.mean(x == TOK.mask_id)
    kept = np.mean(x == y)
    replaced = np.mean((x != y) & (x != TOK.mask_id))
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.025 and abs(replaced - 0.1) < 0.025
    assert x.min() >= 0 and x.max() < TOK.vocab_size


def test_real_batches_never_mask_bos_or_padding():
    out = next(masking(builtin_loader()))
    chosen = out["weights"] > 0
    assert chosen.sum() > 0
    assert not chosen[out["targets"] < TOK.num_special].any()  # bos (and any special) stays visible
    assert not chosen[out["segment_ids"] == 0].any()
    assert (out["inputs"][chosen] == TOK.mask_id).any()


def test_masks_depend_on_batch_index_and_seed():
    batch = next(builtin_loader())
    a, b = masking(ArrayLoader(batch)), masking(ArrayLoader(batch), seed=1)
    first, second = next(a)["weights"], next(a)["weights"]
    assert not np.array_equal(first, second)  # the same text is masked afresh each batch
    assert not np.array_equal(first, next(b)["weights"])
    np.testing.assert_array_equal(first, masking(ArrayLoader(batch)).mask(batch, 0)["weights"])


def test_state_round_trip_gives_identical_batches():
    for make in (lambda: builtin_loader(), lambda: builtin_loader(shards=2)):
        ld = masking(make(), seed=3)
        for _ in range(2):
            next(ld)
        saved = json.loads(json.dumps(ld.get_state()))  # it goes through a checkpoint as JSON
        expected = [next(ld) for _ in range(3)]
        fresh = masking(make(), seed=3)
        loop.restore_loader(fresh, [json.dumps(saved)])  # the path a resumed stage takes
        assert fresh.batch_index == 2
        for want in expected:
            got = next(fresh)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    with pytest.raises(DataError, match="seed=.*would not continue"):
        masking(builtin_loader(), seed=4).set_state(saved)
    with pytest.raises(DataError, match="no masking position"):
        masking(builtin_loader()).set_state(builtin_loader().get_state())


def test_masks_are_the_same_for_any_process_count():
    """Two shards in one process (one ShardedLoader) or one shard per process
    (two Loaders) give the same global batch and the same masks."""
    whole = next(masking(builtin_loader(shards=2), seed=5))
    cfg = DataConfig(source="builtin:pretrain", seq_len=64, batch_size=8, size=200)
    parts = [next(masking(Loader(cfg, TOK, shard_index=i, shard_count=2), seed=5)) for i in (0, 1)]
    for k in whole:
        np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]), err_msg=k)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="mask_prob=1.5"):
        masking(builtin_loader(), mask_prob=1.5)
    with pytest.raises(ConfigError, match="mask_id=300"):
        mlm.MaskingLoader(builtin_loader(), mask_id=300, vocab_size=TOK.vocab_size)
    causal = preset("tiny", vocab_size=TOK.vocab_size)
    with pytest.raises(ConfigError, match="bidirectional encoder.*causal=True"):
        mlm.mlm_loss_fn(causal)
    with pytest.raises(ConfigError, match="bidirectional encoder"):
        mlm.eval_batch(causal, None, None)


@jax.jit
def encoder_logits(params, batch):
    return model.apply(CFG, params, batch["inputs"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"])


LOSS = jax.jit(mlm.mlm_loss_fn(CFG))  # compiled once for every call below
EVAL = jax.jit(mlm.eval_batch, static_argnums=0)


def test_loss_and_accuracy_match_numpy_reference():
    params = model.init(CFG, jax.random.PRNGKey(0))
    batch = next(masking(builtin_loader(rows=16)))
    logits = np.asarray(encoder_logits(params, batch), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    w = batch["weights"].astype(np.float64)
    nll = -np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
    correct = (logits.argmax(-1) == batch["targets"]) * w
    ref_loss, ref_acc = (w * nll).sum() / w.sum(), correct.sum() / w.sum()

    norm = mlm.normalizer(batch)
    assert float(norm) == w.sum()
    loss, m = LOSS(params, batch, jax.random.PRNGKey(0), norm)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(m["accuracy"], ref_acc, rtol=1e-6)

    total, hits, count = EVAL(CFG, params, batch)
    assert float(count) == w.sum() and float(hits) == correct.sum()
    np.testing.assert_allclose(total, (w * nll).sum(), rtol=1e-5)

    # Unchosen positions do not count: changing their targets leaves the loss alone.
    other = dict(batch, targets=np.where(w > 0, batch["targets"], (batch["targets"] + 7) % TOK.vocab_size))
    np.testing.assert_allclose(LOSS(params, other, jax.random.PRNGKey(0), norm)[0], loss, rtol=1e-6)

    # Nothing chosen: loss 0, not 0/0.
    empty = dict(batch, weights=np.zeros_like(batch["weights"]))
    assert float(LOSS(params, empty, jax.random.PRNGKey(0), mlm.normalizer(empty))[0]) == 0.0


def heldout(params, eval_loader, start, batches=4):
    eval_loader.set_state(start)
    sums = np.zeros(3)
    for _ in range(batches):
        sums += np.asarray([float(x) for x in EVAL(CFG, params, next(eval_loader))])
    return sums[0] / sums[2], sums[1] / sums[2]


def test_training_lowers_heldout_masked_token_loss():
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    steps = 60
    tx, schedule = train.make_optimizer(OptimizerConfig(lr=3e-3, warmup_steps=5), steps)
    state, shardings = train.create_train_state(lambda r: model.init(CFG, r), tx, mesh, seed=0)
    step = train.jit_train_step(train.make_train_step(mlm.mlm_loss_fn(CFG), mlm.normalizer, tx, schedule),
                                mesh, shardings)
    data = masking(builtin_loader(rows=16), seed=0)
    evals = masking(builtin_loader(split="eval", rows=16, shuffle=False), seed=1)
    start = evals.get_state()
    loss0, acc0 = heldout(state.params, evals, start)
    for _ in range(steps):
        state, m = step(state, sharding.shard_batch(next(data), mesh))
    loss1, acc1 = heldout(state.params, evals, start)
    # Measured with the init, state seed, data and masking seed of seeds 0-4 (seed 0 is this
    # test): loss0 5.42-5.52; loss drop 2.21, 2.21, 2.27, 2.30, 2.20 (margin 0.7 to 1.5);
    # accuracy gain 0.110, 0.112, 0.127, 0.110, 0.115: only 0.01 above 0.1 (about 6 of the
    # ~600 held-out masked tokens) at this test's own seed; too close for comfort, kept.
    assert loss0 > 5.0  # about log(262) at initialization
    assert loss1 < loss0 - 1.5, (loss0, loss1)
    assert acc1 > acc0 + 0.1, (acc0, acc1)
