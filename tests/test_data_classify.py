"""llm_jax.data.classify: the built-in classification task (labels, held-out split,
no surface token that tells the label) and `{"text","label"}` JSONL records through
the loader (bad lines skipped and counted, an out-of-range label named)."""

import json
import random

import numpy as np
import pytest

from llm_jax.data import builtin
from llm_jax.data import classify as classify_data
from llm_jax.data.errors import DataError
from llm_jax.data.loader import DataConfig, Loader
from llm_jax.data.sources import open_source
from llm_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_builtin_task_labels_splits_and_no_surface_token():
    src = open_source("builtin:classify", split="train", size=3000)
    held = open_source("builtin:classify", split="eval", size=3000)
    assert src.kind == "classification" and len(held.records) == 300
    train_recs = [src.records[i] for i in range(len(src.records))]
    eval_recs = [held.records[i] for i in range(len(held.records))]
    # the program's label (the world's scorers) is the record's label, for every record
    for r in train_recs + eval_recs:
        assert classify_data.label_of(r["text"]) == r["label"], r
    # an eval query never appears in training under any label
    assert not {r["query"] for r in train_recs} & {r["query"] for r in eval_recs}
    counts = np.bincount([r["label"] for r in train_recs], minlength=3)
    assert counts.min() > 0.28 * len(train_recs)  # about a third each
    # no token tells the label: the three answers to one query use the same letters, same length
    rng = random.Random(0)
    for _ in range(50):
        xs = classify_data.draw_query(rng, "train")
        texts = [" ".join(xs) + " -> " + " ".join(classify_data.apply_rule(c, xs))
                 for c in classify_data.CLASSES]
        assert len({"".join(sorted(t)) for t in texts}) == 1 and len(set(texts)) == 3
        assert [classify_data.label_of(t) for t in texts] == [0, 1, 2]
    # the reference is the world's scorers: a reversal the reverse task accepts
    assert builtin.score("reverse", "q d a m", "m a d q") and classify_data.label_of("q d a m -> m a d q") == 1
    assert classify_data.label_of("q d a m -> d q a m") is None  # no rule
    with pytest.raises(DataError, match="unknown task 'max'"):
        open_source("builtin:classify/max")
    subset = open_source("builtin:classify/same,sort", size=200)
    assert {subset.records[i]["label"] for i in range(200)} == {0, 2}  # labels keep their index


def _write(path, lines):
    path.write_text("".join(lines))
    return str(path)


def test_jsonl_records_bad_lines_skipped_and_counted(tmp_path):
    lines = [json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(6)]
    lines.insert(2, "{broken\n")  # line 3
    lines.insert(5, json.dumps({"text": "x", "label": "one"}) + "\n")  # line 6
    path = _write(tmp_path / "labels.jsonl", lines)
    cfg = DataConfig(source=f"jsonl:{path}", cache_dir=str(tmp_path / "cache"), seq_len=16, batch_size=8,
                     max_segments=1, shuffle=False, num_epochs=1, num_classes=2, kind="classification")
    loader = Loader(cfg, TOK, shard_index=0, shard_count=1)
    # Not inferred from the fields: {"text", "label"} without a kind stays a pretraining corpus.
    assert open_source(f"jsonl:{path}", cache_dir=str(tmp_path / "cache")).kind == "pretrain"
    batch = next(loader)
    mask = batch["label_mask"][:, 0] > 0
    assert mask.sum() == 6
    # each row's label is the one its text says (item i has label i % 2)
    for row in np.nonzero(mask)[0]:
        text = bytes(int(t) - TOK.offset for t in batch["inputs"][row][batch["segment_ids"][row] > 0][1:])
        assert batch["labels"][row, 0] == int(text.decode().split()[-1]) % 2
    built = loader.stats["skipped_when_built"]
    places = sorted(p for ps in built["places"].values() for p in ps)
    assert sum(built["counts"].values()) == 2 and places == [f"{path}:3", f"{path}:6"]
    # Packed several to a row: each (row, segment) label is still its own text's.
    packed = Loader(DataConfig(**{**cfg.__dict__, "seq_len": 32, "max_segments": 4}), TOK,
                    shard_index=0, shard_count=1)
    batch, seen = next(packed), 0
    for r, s in zip(*np.nonzero(batch["label_mask"])):
        ids = batch["inputs"][r][batch["segment_ids"][r] == s + 1][1:]  # without bos
        assert batch["labels"][r, s] == int(TOK.decode(ids).split()[-1]) % 2
        seen += 1
    assert seen == 6 and batch["label_mask"].sum(axis=1).max() > 1


def test_label_out_of_range_names_the_line(tmp_path):
    lines = [json.dumps({"text": "ok", "label": 0}) + "\n", json.dumps({"text": "too big", "label": 3}) + "\n"]
    path = _write(tmp_path / "labels.jsonl", lines)
    cfg = DataConfig(source=f"jsonl:{path}", cache_dir=str(tmp_path / "cache"), seq_len=16, batch_size=2,
                     max_segments=1, shuffle=False, num_classes=3, kind="classification")
    with pytest.raises(DataError, match=r"labels\.jsonl:2: field 'label' is 3, but num_classes=3"):
        Loader(cfg, TOK, shard_index=0, shard_count=1)
