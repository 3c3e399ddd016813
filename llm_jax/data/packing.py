"""Packing several sequences into fixed-length rows without cross-talk.

Each sequence keeps its own segment id (attention never crosses segments) and
positions restarting at 0, so a packed row scores every sequence exactly as
if it were alone in its own row.
"""

from __future__ import annotations

import numpy as np


def pack_clm(sequences: list[list[int]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Greedily packs token sequences (each already with its bos/eos) into rows.

    A sequence of n tokens contributes n-1 (input, target) pairs; one longer than
    seq_len + 1 is truncated to its first seq_len + 1 tokens. Returns int32
    inputs/targets/positions/segment_ids and float32 weights, all [rows, seq_len];
    padding has segment 0 and weight 0."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    room = 0
    for seq in sequences:
        seq = list(seq)[: seq_len + 1]
        if len(seq) < 2:
            continue
        n = len(seq) - 1
        if not rows or n > room:
            rows.append([])
            room = seq_len
        rows[-1].append((seq[:-1], seq[1:]))
        room -= n
    shape = (len(rows), seq_len)
    out = {"inputs": np.full(shape, pad_id, np.int32), "targets": np.full(shape, pad_id, np.int32),
           "weights": np.zeros(shape, np.float32), "positions": np.zeros(shape, np.int32),
           "segment_ids": np.zeros(shape, np.int32)}
    for r, row in enumerate(rows):
        t = 0
        for s, (inp, tgt) in enumerate(row, start=1):
            n = len(inp)
            out["inputs"][r, t:t + n] = inp
            out["targets"][r, t:t + n] = tgt
            out["weights"][r, t:t + n] = 1.0
            out["positions"][r, t:t + n] = np.arange(n)
            out["segment_ids"][r, t:t + n] = s
            t += n
    return out


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Real (scored) tokens / slots."""
    return float(batch["weights"].sum() / batch["weights"].size)
