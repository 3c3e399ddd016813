"""Packing several sequences into fixed-length rows without cross-talk.

Each sequence keeps its own segment id (1, 2, ... within a row; attention never
crosses segments) and positions restarting at 0, so a packed row scores every
sequence exactly as if it were alone in its own row. Padding has segment 0 and
weight 0. Loss weights travel with the tokens they score, so an SFT prompt mask
cannot leak onto a neighbouring sequence.

Preference pairs are packed into two aligned sets of tensors, `chosen_*` and
`rejected_*`: pair k sits at the same (row, segment) in both (each set has its
own fill offset in the row), so per-pair values are read with
`sequence_scores` on each set and line up. `pair_mask[row, s]` marks the pairs
that exist.

Rows are filled first-fit: each sequence goes into the first row with room.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from llm_jax.data.formats import Example
from llm_jax.errors import InputError

FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")
PAIR_PREFIXES = ("chosen_", "rejected_")


class FirstFit:
    """Places items (one length per stream) into rows of `seq_len` slots.

    `rows=None` opens a new row whenever nothing fits; with a fixed number of
    rows `place` returns None when the item fits nowhere (the batch is full)."""

    def __init__(self, seq_len: int, rows: int | None = None, max_segments: int | None = None,
                 streams: int = 1):
        self.seq_len, self.rows, self.max_segments = seq_len, rows, max_segments
        self.fill: list[list[int]] = [[0] * streams for _ in range(rows or 0)]
        self.segments: list[int] = [0] * (rows or 0)

    def place(self, lengths: Sequence[int]) -> tuple[int, int, tuple[int, ...]] | None:
        """(row, segment id, offsets per stream) or None."""
        if max(lengths) > self.seq_len:
            raise InputError(f"a sequence of {max(lengths)} slots cannot fit rows of seq_len={self.seq_len}: "
                             "truncate it to seq_len + 1 tokens (as pack_clm does) or use longer rows")
        for r, fill in enumerate(self.fill):
            if self.max_segments is not None and self.segments[r] >= self.max_segments:
                continue
            if all(f + n <= self.seq_len for f, n in zip(fill, lengths)):
                return self._put(r, lengths)
        if self.rows is not None:
            return None
        self.fill.append([0] * len(lengths))
        self.segments.append(0)
        return self._put(len(self.fill) - 1, lengths)

    def full(self) -> bool:
        """No fixed row can take even a one-slot sequence."""
        return self.rows is not None and all(
            max(fill) >= self.seq_len or (self.max_segments is not None and n >= self.max_segments)
            for fill, n in zip(self.fill, self.segments))

    def _put(self, r: int, lengths: Sequence[int]) -> tuple[int, int, tuple[int, ...]]:
        offsets = tuple(self.fill[r])
        self.fill[r] = [f + n for f, n in zip(self.fill[r], lengths)]
        self.segments[r] += 1
        return r, self.segments[r], offsets


def empty_batch(rows: int, seq_len: int, prefixes: Sequence[str] = ("",), pad_id: int = 0,
                max_segments: int | None = None) -> dict[str, np.ndarray]:
    out = {}
    for p in prefixes:
        for f in FIELDS:
            fill = pad_id if f in ("inputs", "targets") else 0
            out[p + f] = np.full((rows, seq_len), fill, np.float32 if f == "weights" else np.int32)
    if max_segments is not None and len(prefixes) == 2:
        out["pair_mask"] = np.zeros((rows, max_segments), np.float32)
    return out


def write(batch: dict[str, np.ndarray], prefix: str, example: Example, row: int, offset: int,
          segment: int) -> None:
    """Writes one example's (input, target, weight) slots at [row, offset:offset + n]."""
    tokens, weights = example
    n = len(tokens) - 1
    sl = (row, slice(offset, offset + n))
    batch[prefix + "inputs"][sl] = tokens[:-1]
    batch[prefix + "targets"][sl] = tokens[1:]
    batch[prefix + "weights"][sl] = weights[1:]
    batch[prefix + "positions"][sl] = np.arange(n)
    batch[prefix + "segment_ids"][sl] = segment


def pack_examples(examples: list, seq_len: int, pad_id: int = 0, max_segments: int | None = None):
    """Packs every example (or every (chosen, rejected) pair) into as many rows as needed.

    Returns (batch, placements): placements[i] = (row, segment) of example i."""
    pairs = bool(examples) and isinstance(examples[0][0], tuple)
    items = examples if pairs else [(e,) for e in examples]
    packer = FirstFit(seq_len, None, max_segments, streams=len(items[0]) if items else 1)
    spots = [packer.place([len(e[0]) - 1 for e in item]) for item in items]
    prefixes = PAIR_PREFIXES if pairs else ("",)
    batch = empty_batch(len(packer.fill), seq_len, prefixes, pad_id, max_segments)
    for item, (row, seg, offsets) in zip(items, spots):
        for prefix, ex, off in zip(prefixes, item, offsets):
            write(batch, prefix, ex, row, off, seg)
        if "pair_mask" in batch:
            batch["pair_mask"][row, seg - 1] = 1.0
    return batch, [(r, s) for r, s, _ in spots]


def pack_clm(sequences: list[list[int]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Packs token sequences (each already with its bos/eos), every target weighted 1.

    A sequence of n tokens contributes n-1 (input, target) pairs; one longer than
    seq_len + 1 is truncated to its first seq_len + 1 tokens; one shorter than 2
    is dropped. Returns int32 inputs/targets/positions/segment_ids and float32
    weights, all [rows, seq_len]."""
    examples = []
    for seq in sequences:
        seq = np.asarray(list(seq)[: seq_len + 1], np.int32)
        if len(seq) >= 2:
            w = np.ones(len(seq), np.float32)
            w[0] = 0.0
            examples.append((seq, w))
    return pack_examples(examples, seq_len, pad_id)[0]


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Real (non-padding) token slots / all slots, over every set of tensors in the batch."""
    segs = [v for k, v in batch.items() if k.endswith("segment_ids")]
    return float(sum((s > 0).sum() for s in segs) / sum(s.size for s in segs))


def sequence_scores(values, segment_ids, max_segments: int):
    """Per-(row, segment) sums of per-token values: [R, T] -> [R, max_segments].

        out[r, s] = sum_t values[r, t] * [segment_ids[r, t] == s + 1]

    E.g. values = token_logprobs * weights gives each packed sequence's
    log-prob (a DPO/RM stage reads pair k of a packed preference batch at the
    same [row, segment] of its chosen and rejected sets). Pure jax.numpy; a
    select-and-sum rather than a one-hot matmul, so it stays exact in float32
    on accelerators whose default matmul precision is lower."""
    hit = segment_ids[..., None] == jnp.arange(1, max_segments + 1)  # [R, T, S]
    return jnp.sum(jnp.where(hit, jnp.asarray(values)[..., None], 0), axis=1)  # [R, S]


def segment_mask(segment_ids, max_segments: int):
    """[R, max_segments] float: 1 where segment s + 1 exists in row r."""
    hit = segment_ids[..., None] == jnp.arange(1, max_segments + 1)
    return jnp.any(hit, axis=1).astype(jnp.float32)
