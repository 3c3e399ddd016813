"""Sources by name, local files through TFDS ArrayRecord without TensorFlow, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llm_jax.data.errors import DataError
from llm_jax.data.loader import DataConfig, Loader
from llm_jax.data.sources import open_source
from llm_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def write(path, lines, mode="w"):
    with open(path, mode) as f:
        f.write(lines)
    return str(path)


def loader(tmp_path, source, **kw):
    cfg = DataConfig(source=source, cache_dir=str(tmp_path / "cache"), seq_len=kw.pop("seq_len", 64),
                     batch_size=kw.pop("batch_size", 4), **kw)
    return Loader(cfg, TOK, shard_index=0, shard_count=1)


def test_local_files_are_read_through_tfds_without_tensorflow(tmp_path):
    # In a fresh interpreter: this test process may have imported TF through other tests' plugins.
    path = write(tmp_path / "d.jsonl", "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n"
                                               for i in range(20)))
    code = (f"import sys; from llm_jax.data.sources import open_source; "
            f"s = open_source('jsonl:{path}', cache_dir='{tmp_path}/cache'); "
            f"print(s.kind, len(s.records), type(s.records).__module__, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1].split() == ["sft", "20", "tensorflow_datasets.core.data_sources.array_record", "False"]


def test_local_dataset_is_built_once_and_rebuilt_when_the_file_changes(tmp_path):
    path = write(tmp_path / "t.txt", "first doc\nline two\n\n\nsecond doc\n")
    src = open_source(f"text:{path}", cache_dir=str(tmp_path / "cache"))
    texts = sorted(r["text"].decode() for r in src.records)
    assert texts == ["first doc\nline two", "second doc"]  # blank-line separated, inner newlines kept
    assert sorted(int(r["line"]) for r in src.records) == [1, 5]
    built = os.listdir(tmp_path / "cache")
    open_source(f"text:{path}", cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == built  # same content: reused
    write(tmp_path / "t.txt", "third doc\n")
    src = open_source(f"text:{path}", cache_dir=str(tmp_path / "cache"))
    assert [r["text"] for r in src.records] == [b"third doc"]
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_tfds_catalog_source_via_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        ld = loader(tmp_path, "tfds:imdb_reviews/plain_text", data_dir=str(tmp_path))
        assert ld.kind == "pretrain" and ld.epoch_len == 12
        batch = next(ld)
    assert batch["inputs"].shape == (4, 64) and batch["weights"].sum() > 0


def test_tfds_unknown_or_unprepared_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no_such_dataset_xyz: no such dataset in the TFDS catalog"):
        open_source("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
    with pytest.raises(DataError, match=rf"tfds:mnist: split 'train' is not prepared .* data_dir={tmp_path}"):
        open_source("tfds:mnist", data_dir=str(tmp_path), download=False)


def test_bad_jsonl_records_are_skipped_and_counted_with_lines(tmp_path):
    lines = [json.dumps({"prompt": "good", "response": "yes"}),       # 1
             "{not json",                                              # 2
             json.dumps({"prompt": "no response"}),                    # 3
             json.dumps({"prompt": "typed", "response": 7}),           # 4
             "",                                                       # 5: blank, not a record
             json.dumps({"prompt": "  ", "response": "empty prompt"}),  # 6
             json.dumps(["a", "list"]),                                # 7
             json.dumps({"prompt": "good too", "response": "ok"})]     # 8
    path = write(tmp_path / "sft.jsonl", "\n".join(lines) + "\n")
    with open(path, "ab") as f:
        f.write(b'{"prompt": "\xff\xfe", "response": "bad bytes"}\n')    # 9
    ld = loader(tmp_path, f"jsonl:{path}", kind="sft")
    built = ld.stats["skipped_when_built"]
    assert built["counts"] == {"malformed JSON (Expecting property name enclosed in double quotes)": 1,
                               "missing field 'response'": 1, "field 'response' is int, not a string": 1,
                               "empty field 'prompt'": 1, "not a JSON object (list)": 1,
                               "line is not valid UTF-8": 1}
    assert built["places"]["missing field 'response'"] == [f"{path}:3"]
    assert built["places"]["line is not valid UTF-8"] == [f"{path}:9"]
    assert ld.epoch_len == 2
    batch = next(ld)
    assert (batch["segment_ids"] > 0).any()


def test_empty_and_useless_files_fail_before_training(tmp_path):
    empty = write(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataError, match=r"empty.jsonl: the file is empty"):
        loader(tmp_path, f"jsonl:{empty}", kind="sft")
    with pytest.raises(DataError, match=r"nope.txt: no such file"):
        loader(tmp_path, f"text:{tmp_path}/nope.txt")
    bad = write(tmp_path / "bad.jsonl", '{"text": "only text"}\n{broken\n')
    with pytest.raises(DataError, match=r"no usable sft record .*missing field 'prompt'.*bad.jsonl:1"):
        loader(tmp_path, f"jsonl:{bad}", kind="sft")
    blank = write(tmp_path / "blank.txt", "\n\n   \n")
    with pytest.raises(DataError, match="no usable pretrain record"):
        loader(tmp_path, f"text:{blank}")
    notutf = write(tmp_path / "latin1.txt", "caf\xe9\n".encode("latin-1"), mode="wb")
    with pytest.raises(DataError, match=r"paragraph is not valid UTF-8 \(first at .*latin1.txt:1\)"):
        loader(tmp_path, f"text:{notutf}")


def test_too_long_records_follow_the_policy(tmp_path):
    long_prompt = {"prompt": "x" * 100, "response": "y"}     # prompt alone > seq_len: dropped
    long_response = {"prompt": "p", "response": "z" * 100}   # response truncated to the context
    ok = {"prompt": "p", "response": "r"}
    path = write(tmp_path / "long.jsonl", "".join(json.dumps(r) + "\n" for r in (long_prompt, long_response, ok)))
    ld = loader(tmp_path, f"jsonl:{path}", kind="sft", seq_len=32, shuffle=False, num_epochs=1)
    rows = list(ld)
    assert ld.stats["skipped"] == {"prompt does not fit the context": 1}
    assert ld.stats["skipped_at"]["prompt does not fit the context"] == [f"{path}:1"]
    assert ld.stats["truncated"] == 1 and ld.stats["records_used"] == 2
    b = rows[0]
    # the truncated response fills a whole row: 32 slots, prompt part [bos, prompt, 'p', response] unweighted
    full = np.flatnonzero(b["segment_ids"][:, -1] > 0)
    assert len(full) == 1 and b["weights"][full[0]].sum() == 32 - 3
    assert TOK.eos_id not in b["targets"][full[0]]  # its eos was cut off
    # an all-too-long source raises before training
    path2 = write(tmp_path / "long2.jsonl", json.dumps(long_prompt) + "\n")
    with pytest.raises(DataError, match="no usable sft record.*prompt does not fit the context"):
        loader(tmp_path, f"jsonl:{path2}", kind="sft", seq_len=32)


def test_long_pretraining_text_is_chunked_not_dropped(tmp_path):
    path = write(tmp_path / "long.txt", "a" * 100 + "\n")
    ld = loader(tmp_path, f"text:{path}", seq_len=32, shuffle=False, num_epochs=1)
    b = next(ld)
    # [bos] + 100 bytes + [eos] = 102 tokens = 101 targets, all scored once: 32 + 32 + 32 + 5
    assert b["weights"].sum() == 101 and ld.stats["truncated"] == 3
    assert list(b["targets"][b["weights"] > 0][-1:]) == [TOK.eos_id]


def test_source_name_errors():
    for bad, msg in [("pretrain", "expected SCHEME:NAME"), ("ftp:x", "unknown scheme 'ftp'"),
                     ("builtin:nothing", "unknown built-in source 'nothing'"),
                     ("builtin:sft/juggle", "unknown task 'juggle'")]:
        with pytest.raises(DataError, match=msg):
            open_source(bad)
    with pytest.raises(DataError, match='builtin:sft holds sft records .*; the pretraining stage needs'):
        open_source("builtin:sft", kind="pretrain")
    with pytest.raises(DataError, match="split 'test'"):
        open_source("builtin:sft", split="test")
