"""Nothing lost, nothing silent: bad records are reported where users look, a stage
refuses records of the wrong kind before anything trains, and JSON edge cases are
skipped with their file:line like any other bad line."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llm_jax import loop
from llm_jax.data.errors import DataError
from llm_jax.data.loader import DataConfig, Loader, ShardedLoader
from llm_jax.data.sources import open_source
from llm_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def write(path, lines: list[bytes | str]) -> str:
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")) + b"\n")
    return str(path)


def config(tmp_path, source, **kw) -> DataConfig:
    return DataConfig(source=source, cache_dir=str(tmp_path / "cache"), seq_len=kw.pop("seq_len", 64),
                      batch_size=kw.pop("batch_size", 4), **kw)


def loader(tmp_path, source, **kw) -> Loader:
    return Loader(config(tmp_path, source, **kw), TOK, shard_index=0, shard_count=1)


# ---------------------------------------------------------------------------
# 6. Skips made while building a local file: printed at start, counted in data_skipped


def test_build_time_skips_are_printed_once_and_counted_in_data_skipped(tmp_path, capsys):
    good = [json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) for i in range(8)]
    bad = ["{not json",                                           # line 9: malformed JSON
           json.dumps({"prompt": "typed", "response": 7}),        # line 10: wrong type
           json.dumps({"prompt": "no response"}),                 # line 11: missing field
           b'{"prompt": "\xff", "response": "r"}',                # line 12: not UTF-8
           b'{"prompt": "a\x00b", "response": "r"}',              # line 13: a raw NUL byte
           json.dumps({"prompt": "x" * 100, "response": "r"})]    # line 14: too long (found when read)
    path = write(tmp_path / "sft.jsonl", good + bad)
    # Two data shards: the file's build report is one report, not one per shard.
    ld = ShardedLoader(config(tmp_path, f"jsonl:{path}", kind="sft", seq_len=32, shuffle=False,
                              num_epochs=1), TOK, 2)
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if "skipped" in x]
    assert len(lines) == 1, out  # one line, not one per shard
    line = lines[0]
    assert f"jsonl:{path}" in line and "skipped 5 " in line
    for reason, place in [("malformed JSON", 9), ("field 'response' is int, not a string", 10),
                          ("missing field 'response'", 11), ("not valid UTF-8", 12)]:
        assert reason in line and f"sft.jsonl:{place}" in line, (reason, line)
    assert "sft.jsonl:13" in line  # the NUL byte: also malformed JSON, with its line
    # The metric counts them from the first step on ...
    assert loop.data_metrics(ld)["data_skipped"] == 5
    list(ld)  # ... and adds what reading finds (the prompt that fits no context)
    assert loop.data_metrics(ld)["data_skipped"] == 6
    assert ld.stats["skipped"]["prompt does not fit the context"] == 1
    assert sum(ld.stats["skipped_when_built"]["counts"].values()) == 5


def test_nothing_printed_for_a_clean_file(tmp_path, capsys):
    path = write(tmp_path / "ok.jsonl", [json.dumps({"text": f"doc {i}"}) for i in range(4)])
    ld = loader(tmp_path, f"jsonl:{path}", kind="pretrain")
    assert "skipped" not in capsys.readouterr().out
    assert loop.data_metrics(ld)["data_skipped"] == 0


# ---------------------------------------------------------------------------
# 7. A stage given records of the wrong kind stops before training, naming both kinds

RECORDS = {"pretrain": {"text": "a document"},
           "sft": {"prompt": "q", "response": "a"},
           "preferences": {"prompt": "q", "chosen": "good", "rejected": "bad"},
           "classification": {"text": "a line", "label": 1}}
FIELDS = {"pretrain": '{"text"}', "sft": '{"prompt","response"}',
          "preferences": '{"prompt","chosen","rejected"}', "classification": '{"text","label"}'}
NAMES = {"pretrain": "pretraining", "sft": "sft", "preferences": "preference",
         "classification": "classification"}


@pytest.mark.parametrize("have,need", [("pretrain", "sft"), ("preferences", "sft"), ("sft", "preferences"),
                                       ("pretrain", "classification"), ("sft", "pretrain"),
                                       ("classification", "preferences")])
def test_jsonl_of_the_wrong_kind_is_named(tmp_path, have, need):
    path = write(tmp_path / "x.jsonl", [json.dumps(RECORDS[have])] * 3)
    want = (f"data.source=jsonl:{path} holds {NAMES[have]} records {FIELDS[have]}; "
            f"the {NAMES[need]} stage needs {FIELDS[need]} records")
    with pytest.raises(DataError) as e:
        loader(tmp_path, f"jsonl:{path}", kind=need)
    assert want in str(e.value)


def test_records_with_more_fields_than_needed_are_fine(tmp_path):
    # {"text", "label"} is also a pretraining corpus (the labels are not read)
    path = write(tmp_path / "x.jsonl", [json.dumps(RECORDS["classification"])] * 3)
    assert next(loader(tmp_path, f"jsonl:{path}", kind="pretrain"))["weights"].sum() > 0


def test_builtin_text_and_tfds_sources_of_the_wrong_kind_are_named(tmp_path):
    with pytest.raises(DataError, match=r'data.source=builtin:preferences holds preference records '
                                        r'\{"prompt","chosen","rejected"\}; the sft stage needs'):
        loader(tmp_path, "builtin:preferences", kind="sft")
    path = write(tmp_path / "t.txt", ["a paragraph"])
    with pytest.raises(DataError, match=rf'data.source=text:{path} holds pretraining records \{{"text"\}}; '
                                        r'the sft stage needs \{"prompt","response"\} records'):
        loader(tmp_path, f"text:{path}", kind="sft")
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(DataError, match=r'data.source=tfds:imdb_reviews/plain_text holds classification '
                                            r'records \{"text","label"\}; the sft stage needs'):
            loader(tmp_path, "tfds:imdb_reviews/plain_text", data_dir=str(tmp_path), kind="sft")


def test_sft_on_preference_data_stops_before_pretraining(tmp_path):
    """The pipeline checks every stage's records before its first stage trains
    (it used to pretrain, then end SFT in KeyError: 'weights')."""
    from experiments import pipeline

    workdir = tmp_path / "run"
    argv = ["--workdir", str(workdir), "--set", "sft.data.source=builtin:preferences",
            "--set", "pretrain.train.steps=1", "--set", "pretrain.eval_batches=1", "--set", "eval.icl_per_task=1"]
    with pytest.raises(DataError, match=r"data.source=builtin:preferences holds preference records .*"
                                        r"the sft stage needs"):
        pipeline.main(argv)
    assert not os.path.exists(workdir / "pretrain" / "metrics.jsonl")


def test_llama_dpo_on_sft_data_stops_before_sft(tmp_path):
    from experiments import llama_sft_dpo

    sft = write(tmp_path / "sft.jsonl", [json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(20)])
    workdir = tmp_path / "run"
    sets = ["model.vocab_size=300", "model.d_model=32", "model.num_layers=1", "model.num_heads=2",
            "model.num_kv_heads=1", "model.d_ff=64", "model.max_len=64",
            "sft.train.steps=1", "sft.train.batch_size=8", "sft.train.seq_len=64",
            "dpo.train.steps=1", "dpo.train.batch_size=8", "dpo.train.seq_len=64",
            f"sft.data.source=jsonl:{sft}", f"dpo.data.source=jsonl:{sft}",
            f"sft.data.cache_dir={tmp_path / 'cache'}", f"dpo.data.cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(DataError, match=rf'data.source=jsonl:{sft} holds sft records .*the preference stage'):
        llama_sft_dpo.main(["--workdir", str(workdir)] + [x for s in sets for x in ("--set", s)])
    assert not os.path.exists(workdir / "sft" / "metrics.jsonl")


# ---------------------------------------------------------------------------
# 10. JSON edge cases are bad lines like any other; so is a pair made equal by truncation


EDGE_LINES = {
    "lone surrogate": ('{"text": "a \\ud800 b", "label": 0}', "not valid Unicode"),
    "2**63": ('{"text": "t", "label": 9223372036854775808}', "too large"),
    "2**31": ('{"text": "t", "label": 2147483648}', "too large"),  # labels are int32 in a batch
    "a 5000-digit integer": ('{"text": "t", "label": ' + "9" * 5000 + "}", "number too long to read"),
    "deep nesting": ('{"text": ' + "[" * 100_000 + "]" * 100_000 + ', "label": 0}', "nested too deeply"),
    "NaN": ('{"text": "t", "label": NaN}', "is NaN, not an integer class index"),
    "Infinity": ('{"text": "t", "label": Infinity}', "is Infinity, not an integer class index"),
    "-Infinity": ('{"text": "t", "label": -Infinity}', "is -Infinity, not an integer class index"),
}


@pytest.mark.parametrize("case", sorted(EDGE_LINES))
def test_json_edge_cases_are_skipped_with_their_line(tmp_path, case):
    line, reason = EDGE_LINES[case]
    good = json.dumps({"text": "fine", "label": 1})
    path = write(tmp_path / "edge.jsonl", [good, line, good])
    ld = loader(tmp_path, f"jsonl:{path}", kind="classification", num_classes=2)
    built = ld.stats["skipped_when_built"]
    assert sum(built["counts"].values()) == 1, built
    (got, places), = built["places"].items()
    assert reason in got and places == [f"{path}:2"], built
    assert len(got) < 200  # the reason names the problem, it does not repeat the value
    assert ld.epoch_len == 2


def test_edge_case_first_line_does_not_break_kind_inference(tmp_path):
    # With no kind given, the first JSON object decides it: a line that cannot be read
    # (deep nesting, a huge integer) is passed over there too, then skipped and counted.
    path = write(tmp_path / "x.jsonl", ["[" * 100_000 + "]" * 100_000, '{"text": ' + "9" * 5000 + "}",
                                        json.dumps({"text": "a document"})])
    src = open_source(f"jsonl:{path}", cache_dir=str(tmp_path / "cache"))
    assert src.kind == "pretrain" and len(src.records) == 1 and src.build_report.total == 2


def test_lone_surrogate_in_a_pair_is_skipped(tmp_path):
    path = write(tmp_path / "p.jsonl", ['{"prompt": "q", "chosen": "\\udfff", "rejected": "no"}',
                                        json.dumps(RECORDS["preferences"])])
    ld = loader(tmp_path, f"jsonl:{path}", kind="preferences")
    assert ld.stats["skipped_when_built"]["places"] == {
        "field 'chosen' is not valid Unicode (a lone surrogate)": [f"{path}:1"]}


def test_pair_equal_after_truncation_is_dropped_and_counted(tmp_path):
    # seq_len 32: a row holds 33 tokens; the prompt part [bos, <prompt>, 'q', <response>]
    # takes 4, so 29 response tokens fit (bytes, one token each) and the eos is cut off.
    seq = 32
    fits = 33 - 4
    records = [{"prompt": "q", "chosen": "x" * fits + "A", "rejected": "x" * fits + "B"},      # equal once cut
               {"prompt": "q", "chosen": "x" * (fits - 1) + "A", "rejected": "x" * (fits - 1) + "B"},  # last slot differs
               {"prompt": "q", "chosen": "yes", "rejected": "no"}]
    path = write(tmp_path / "p.jsonl", [json.dumps(r) for r in records])
    ld = loader(tmp_path, f"jsonl:{path}", kind="preferences", seq_len=seq, batch_size=8, shuffle=False,
                num_epochs=1)
    batches = list(ld)
    assert sum(b["pair_mask"].sum() for b in batches) == 2  # records 2 and 3
    reason = f"chosen and rejected identical after truncation to seq_len={seq}"
    assert ld.stats["skipped"] == {reason: 1}
    assert ld.stats["skipped_at"][reason] == [f"{path}:1"]
    assert loop.data_metrics(ld)["data_skipped"] == 1
    # every pair left really differs somewhere in its scored tokens
    for b in batches:
        for r, s in zip(*np.nonzero(b["pair_mask"])):
            c = b["chosen_targets"][r][b["chosen_segment_ids"][r] == s + 1]
            j = b["rejected_targets"][r][b["rejected_segment_ids"][r] == s + 1]
            assert len(c) != len(j) or (c != j).any()
