"""The Hugging Face reader refuses what it cannot read exactly, naming the file and
the tensor or field: malformed safetensors headers, sharded indexes that reach
outside the model directory, and config.json fields that are missing or mistyped.

Every malformed file here is written by hand (struct + json), never by the code
under test, and each case was seen to fail (load silently, or raise something
other than an HFError naming the culprit) before the reader validated it. The
well-formed files built the same way load (the first tests), so a refusal below
is the malformation's doing, not the builder's.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from llm_jax import hf

# ---------------------------------------------------------------------------
# Hand-made files


def safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header, the data.
    `header` is a dict (JSON-encoded here) or raw bytes; `length` overrides the
    length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def pack(tensors: dict[str, np.ndarray], metadata=None) -> bytes:
    """A well-formed float32 safetensors file of `tensors`, in the given order."""
    header, blobs, offset = ({"__metadata__": metadata} if metadata is not None else {}), [], 0
    for name, a in tensors.items():
        blob = np.ascontiguousarray(a, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    return safetensors_bytes(header, b"".join(blobs))


# A Llama of one layer: 2 heads of 2 sharing one kv head, tied embeddings.
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 4,
         "intermediate_size": 6, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 2, "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "rope_scaling": None, "tie_word_embeddings": True, "hidden_act": "silu"}
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 8, "n_embd": 4, "n_layer": 1,
        "n_head": 2, "n_inner": None, "n_positions": 16, "layer_norm_epsilon": 1e-5}
BERT = {"model_type": "bert", "vocab_size": 8, "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 6, "max_position_embeddings": 16, "type_vocab_size": 2}


def llama_tensors() -> dict[str, np.ndarray]:
    V, D, F, N, G, H = 8, 4, 6, 2, 1, 2
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for name, shape in (("input_layernorm", (D,)), ("post_attention_layernorm", (D,)),
                        ("self_attn.q_proj", (N * H, D)), ("self_attn.k_proj", (G * H, D)),
                        ("self_attn.v_proj", (G * H, D)), ("self_attn.o_proj", (D, N * H)),
                        ("mlp.up_proj", (F, D)), ("mlp.gate_proj", (F, D)), ("mlp.down_proj", (D, F))):
        shapes[f"model.layers.0.{name}.weight"] = shape
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def gpt2_tensors() -> dict[str, np.ndarray]:
    V, D, F, P = 8, 4, 16, 16
    shapes = {"transformer.wte.weight": (V, D), "transformer.wpe.weight": (P, D),
              "transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)}
    for name, shape in (("ln_1.weight", (D,)), ("ln_1.bias", (D,)), ("ln_2.weight", (D,)), ("ln_2.bias", (D,)),
                        ("attn.c_attn.weight", (D, 3 * D)), ("attn.c_attn.bias", (3 * D,)),
                        ("attn.c_proj.weight", (D, D)), ("attn.c_proj.bias", (D,)),
                        ("mlp.c_fc.weight", (D, F)), ("mlp.c_fc.bias", (F,)),
                        ("mlp.c_proj.weight", (F, D)), ("mlp.c_proj.bias", (D,))):
        shapes[f"transformer.h.0.{name}"] = shape
    rng = np.random.default_rng(0)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def model_dir(path, config: dict | bytes = LLAMA, weights: bytes | None = None) -> str:
    """A HF directory: config.json (a dict, or raw bytes) and model.safetensors."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "wb") as f:
        f.write(config if isinstance(config, bytes) else json.dumps(config).encode())
    if weights is None:
        weights = pack(gpt2_tensors() if isinstance(config, dict) and config.get("model_type") == "gpt2"
                       else llama_tensors())
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(weights)
    return str(path)


def sharded_dir(path, files: dict[str, bytes], weight_map, index_text: str | None = None) -> str:
    """A HF directory with config.json, the shard `files` (name -> bytes) and
    model.safetensors.index.json of `weight_map` (or the raw `index_text`)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(LLAMA, f)
    for name, blob in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(blob)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        f.write(index_text if index_text is not None
                else json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return str(path)


def two_shards() -> tuple[dict[str, bytes], dict[str, str]]:
    """The Llama's tensors in two shards, and the weight_map naming them."""
    tensors = llama_tensors()
    names = list(tensors)
    first, second = names[:5], names[5:]
    files = {"model-00001-of-00002.safetensors": pack({n: tensors[n] for n in first}),
             "model-00002-of-00002.safetensors": pack({n: tensors[n] for n in second})}
    weight_map = {n: "model-00001-of-00002.safetensors" for n in first}
    weight_map.update({n: "model-00002-of-00002.safetensors" for n in second})
    return files, weight_map


def refused(fn, *fragments) -> str:
    """fn() raises an HFError whose message holds every fragment; returns it."""
    with pytest.raises(hf.HFError) as e:
        fn()
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ---------------------------------------------------------------------------
# The builders make files that load


def test_hand_made_checkpoints_load(tmp_path):
    want = llama_tensors()
    cfg, params = hf.load_pretrained(model_dir(tmp_path / "single"))
    assert (cfg.num_layers, cfg.num_heads, cfg.kv_heads, cfg.head_size) == (1, 2, 1, 2)
    np.testing.assert_array_equal(params["embed"], want["model.embed_tokens.weight"])
    files, weight_map = two_shards()
    _, sharded = hf.load_pretrained(sharded_dir(tmp_path / "sharded", files, weight_map))
    np.testing.assert_array_equal(sharded["layers"]["mlp"]["down"][0], want["model.layers.0.mlp.down_proj.weight"].T)
    cfg, _ = hf.load_pretrained(model_dir(tmp_path / "gpt2", GPT2))
    assert (cfg.d_ff, cfg.tie_embeddings) == (16, True)
    # Zero-size and scalar tensors, __metadata__, and a header padded with spaces are
    # all well-formed safetensors.
    header = {"__metadata__": {"format": "pt"}, "empty": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
              "scalar": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
              "flags": {"dtype": "BOOL", "shape": [2], "data_offsets": [8, 10]}}
    path = tmp_path / "odd.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps(header).encode() + b"    ", struct.pack("<q", -7) + b"\x01\x00"))
    got = hf.read_safetensors(str(path))
    assert got["empty"].shape == (0, 3) and int(got["scalar"]) == -7 and got["flags"].tolist() == [True, False]


def test_a_hub_cache_snapshot_with_symlinked_shards_loads(tmp_path):
    """The Hugging Face hub cache keeps each file of a snapshot as a symlink into
    ../../blobs/: a shard that is itself a symlink is followed, as model.safetensors is."""
    files, weight_map = two_shards()
    blobs = tmp_path / "models--x" / "blobs"
    blobs.mkdir(parents=True)
    snapshot = tmp_path / "models--x" / "snapshots" / "abc123"
    sharded_dir(snapshot, {}, weight_map)
    for i, (name, blob) in enumerate(files.items()):
        (blobs / f"sha{i}").write_bytes(blob)
        os.symlink(f"../../blobs/sha{i}", snapshot / name)
    _, params = hf.load_pretrained(str(snapshot))
    np.testing.assert_array_equal(params["embed"], llama_tensors()["model.embed_tokens.weight"])


# ---------------------------------------------------------------------------
# safetensors headers

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
F32_3 = {"dtype": "F32", "shape": [3], "data_offsets": [8, 20]}
GOOD = {"a": F32_2, "b": F32_3}  # with 20 bytes of data


def with_b(**entry) -> dict:
    return {"a": F32_2, "b": {**F32_3, **entry}}


HEADER_CASES = {
    # name: (file bytes, fragments the HFError names besides the file)
    "header_length_2^62": (safetensors_bytes(GOOD, bytes(20), length=2 ** 62),
                           ["header length 4611686018427387904", "100000000"]),
    "header_length_over_the_spec_limit": (safetensors_bytes(GOOD, bytes(20), length=100_000_001),
                                          ["header length 100000001", "100000000"]),
    "header_length_past_the_end_of_the_file": (safetensors_bytes(GOOD, bytes(20), length=4000),
                                               ["header length 4000", "past the end"]),
    "shorter_than_the_length_field": (b"\x05\x00\x00", ["8-byte header length"]),
    "header_not_utf8": (safetensors_bytes(json.dumps(GOOD).encode("utf-16"), bytes(20)), ["UTF-8"]),
    "header_not_an_object": (safetensors_bytes(b"[1, 2]", b""), ["JSON object", "list"]),
    "duplicate_tensor_name": (safetensors_bytes(b'{"a": %s, "a": %s}' % (json.dumps(F32_2).encode(),
                                                                          json.dumps(F32_2).encode()), bytes(8)),
                              ["'a' twice"]),
    "entry_not_an_object": (safetensors_bytes({"a": F32_2, "b": [8, 20]}, bytes(20)), ["tensor b", "[8, 20]"]),
    "entry_missing_data_offsets": (safetensors_bytes({"a": F32_2, "b": {"dtype": "F32", "shape": [3]}}, bytes(20)),
                                   ["tensor b", "data_offsets"]),
    "entry_with_an_extra_key": (safetensors_bytes(with_b(byte_order="big"), bytes(20)), ["tensor b", "byte_order"]),
    "dtype_not_a_string": (safetensors_bytes(with_b(dtype=["F32"]), bytes(20)), ["tensor b", "['F32']"]),
    "dtype_unsupported": (safetensors_bytes(with_b(dtype="F8_E4M3", shape=[12]), bytes(20)),
                          ["tensor b", "F8_E4M3", "supported: F64, F32"]),
    "shape_negative": (safetensors_bytes(with_b(shape=[-1, 3]), bytes(20)), ["tensor b", "shape [-1, 3]"]),
    "shape_of_floats": (safetensors_bytes(with_b(shape=[3.0]), bytes(20)), ["tensor b", "shape [3.0]"]),
    "shape_of_booleans": (safetensors_bytes(with_b(shape=[True, 3]), bytes(20)), ["tensor b", "shape [True, 3]"]),
    "shape_not_a_list": (safetensors_bytes(with_b(shape=3), bytes(20)), ["tensor b", "shape 3"]),
    "offsets_negative": (safetensors_bytes(with_b(data_offsets=[-12, 0]), bytes(20)), ["tensor b", "[-12, 0]"]),
    "offsets_reversed": (safetensors_bytes(with_b(data_offsets=[20, 8]), bytes(20)), ["tensor b", "[20, 8]"]),
    "offsets_not_a_pair": (safetensors_bytes(with_b(data_offsets=[8, 20, 32]), bytes(20)),
                           ["tensor b", "[8, 20, 32]"]),
    "size_not_shape_times_itemsize": (safetensors_bytes(with_b(shape=[4]), bytes(20)),
                                      ["tensor b", "12 bytes", "shape [4] of F32 needs 16"]),
    "overlapping_tensors": (safetensors_bytes(with_b(shape=[2], data_offsets=[4, 12]), bytes(12)),
                            ["tensor b", "[4, 12]", "overlaps tensor a"]),
    "hole_between_tensors": (safetensors_bytes(with_b(data_offsets=[12, 24]), bytes(24)),
                             ["bytes 8..12", "tensor b"]),
    "bytes_after_the_last_tensor": (safetensors_bytes(GOOD, bytes(28)), ["bytes 20..28", "no tensor"]),
    "tensor_past_the_data": (safetensors_bytes(GOOD, bytes(16)), ["tensor b", "[8, 20]", "16 bytes"]),
    "metadata_not_string_to_string": (safetensors_bytes({"__metadata__": {"format": 1}, **GOOD}, bytes(20)),
                                      ["__metadata__", "'format': 1"]),
    "metadata_not_an_object": (safetensors_bytes({"__metadata__": "pt", **GOOD}, bytes(20)),
                               ["__metadata__", "'pt'"]),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_malformed_safetensors_header_is_named(tmp_path, case):
    blob, fragments = HEADER_CASES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    refused(lambda: hf.read_safetensors(str(path)), str(path), *fragments)


def test_overlapping_tensors_stop_load_pretrained(tmp_path):
    """Through the whole load: two tensors sharing bytes are refused, not read twice."""
    tensors = llama_tensors()
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    # The final norm (4 floats) claims the embedding's first 16 bytes instead of its own.
    end = header["model.norm.weight"]["data_offsets"][1]
    header["model.norm.weight"]["data_offsets"] = [0, 16]
    for name in list(header)[2:]:  # the rest close the gap, so only the overlap is wrong
        header[name]["data_offsets"] = [o - 16 for o in header[name]["data_offsets"]]
    data = b"".join(a.tobytes() for n, a in tensors.items() if n != "model.norm.weight")
    assert end - 16 == tensors["model.embed_tokens.weight"].nbytes
    d = model_dir(tmp_path / "m", weights=safetensors_bytes(header, data))
    refused(lambda: hf.load_pretrained(d), os.path.join(d, "model.safetensors"), "model.norm.weight",
            "model.embed_tokens.weight", "overlaps")


# ---------------------------------------------------------------------------
# Sharded checkpoints: model.safetensors.index.json


SECOND = "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlinked_folder"])
def test_index_paths_outside_the_directory_are_refused(tmp_path, kind):
    """The second shard is a real, loadable file: only its place, outside the model
    directory, is wrong (`..`, an absolute path, a folder symlinked out of it)."""
    files, weight_map = two_shards()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / SECOND).write_bytes(files.pop(SECOND))
    name = {"dotdot": f"../outside/{SECOND}", "absolute": str(outside / SECOND),
            "symlinked_folder": f"sub/{SECOND}"}[kind]
    moved = [n for n, f in weight_map.items() if f == SECOND]  # in the order the index lists them
    d = sharded_dir(tmp_path / "m", files, {**weight_map, **{n: name for n in moved}})
    if kind == "symlinked_folder":
        os.symlink(str(outside), os.path.join(d, "sub"))
    refused(lambda: hf.load_pretrained(d), os.path.join(d, hf.INDEX_FILE), repr(name), moved[0],
            "an absolute path" if kind == "absolute" else "outside")


def test_index_paths_inside_the_directory_load(tmp_path):
    """A subfolder, and a `..` that stays inside, are not refused."""
    files, weight_map = two_shards()
    d = sharded_dir(tmp_path / "m", {SECOND: files[SECOND]}, {
        n: (f if f == SECOND else f"sub/../sub/{f}") for n, f in weight_map.items()})
    os.makedirs(os.path.join(d, "sub"))
    first = "model-00001-of-00002.safetensors"
    with open(os.path.join(d, "sub", first), "wb") as f:
        f.write(files[first])
    _, params = hf.load_pretrained(d)
    np.testing.assert_array_equal(params["embed"], llama_tensors()["model.embed_tokens.weight"])


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    files, weight_map = two_shards()
    del files["model-00002-of-00002.safetensors"]
    d = sharded_dir(tmp_path / "m", files, weight_map)
    tensor = next(n for n, f in weight_map.items() if f == "model-00002-of-00002.safetensors")
    refused(lambda: hf.load_pretrained(d), os.path.join(d, hf.INDEX_FILE), "model-00002-of-00002.safetensors",
            "does not exist", tensor)


@pytest.mark.parametrize("text,fragments", [
    ("{\"weight_map\": ", ["not readable JSON"]),
    ("[\"model-00001-of-00002.safetensors\"]", ["weight_map"]),
    ("{\"metadata\": {}}", ["weight_map"]),
    ("{\"weight_map\": [\"model-00001-of-00002.safetensors\"]}", ["weight_map"]),
    ("{\"weight_map\": {\"model.norm.weight\": 5}}", ["model.norm.weight", "5"]),
], ids=["not_json", "a_list", "no_weight_map", "weight_map_a_list", "file_not_a_string"])
def test_malformed_index_is_named(tmp_path, text, fragments):
    files, weight_map = two_shards()
    d = sharded_dir(tmp_path / "m", files, weight_map, index_text=text)
    refused(lambda: hf.load_pretrained(d), os.path.join(d, hf.INDEX_FILE), *fragments)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    """Read shard by shard, the copy in whichever shard came last would win."""
    tensors = llama_tensors()
    files, weight_map = two_shards()
    # The second shard also holds the embedding (other values); the index says shard 1.
    files[SECOND] = pack({**{n: tensors[n] for n, f in weight_map.items() if f == SECOND},
                          "model.embed_tokens.weight": np.zeros_like(tensors["model.embed_tokens.weight"])})
    d = sharded_dir(tmp_path / "m", files, weight_map)
    refused(lambda: hf.load_pretrained(d), os.path.join(d, SECOND), "model.embed_tokens.weight",
            "model-00001-of-00002.safetensors")


def test_an_index_that_misplaces_a_tensor_is_refused(tmp_path):
    """The index puts a tensor in shard 2, but shard 1 holds it: a stale index."""
    files, weight_map = two_shards()
    misplaced = next(n for n, f in weight_map.items() if f != SECOND)
    d = sharded_dir(tmp_path / "m", files, {**weight_map, misplaced: SECOND})
    refused(lambda: hf.load_pretrained(d), os.path.join(d, hf.INDEX_FILE), misplaced, SECOND)


# ---------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("config,fragments", [
    (b'{"model_type": "llama\xff"}', ["UTF-8"]),
    (b'["llama"]', ["JSON object"]),
], ids=["not_utf8", "a_list"])
def test_unreadable_config_json_is_named(tmp_path, config, fragments):
    d = model_dir(tmp_path / "m", config)
    refused(lambda: hf.load_pretrained(d), os.path.join(d, "config.json"), *fragments)


def test_config_json_that_is_a_folder_is_named(tmp_path):
    d = tmp_path / "m"
    (d / "config.json").mkdir(parents=True)
    refused(lambda: hf.load_pretrained(str(d)), str(d / "config.json"))


MISSING = object()

CONFIG_CASES = [
    # (base, field, value or MISSING, fragments besides the file)
    (LLAMA, "num_hidden_layers", MISSING, ["num_hidden_layers", "missing"]),
    (LLAMA, "num_hidden_layers", "1", ["num_hidden_layers='1'", "positive integer"]),
    (LLAMA, "vocab_size", -5, ["vocab_size=-5", "positive integer"]),
    (LLAMA, "hidden_size", 4.0, ["hidden_size=4.0"]),
    (LLAMA, "num_attention_heads", True, ["num_attention_heads=True"]),
    (LLAMA, "num_key_value_heads", 0, ["num_key_value_heads=0"]),
    (LLAMA, "head_dim", "2", ["head_dim='2'"]),
    (LLAMA, "intermediate_size", None, ["intermediate_size=None"]),
    (LLAMA, "max_position_embeddings", MISSING, ["max_position_embeddings", "missing"]),
    (LLAMA, "rms_norm_eps", "1e-5", ["rms_norm_eps='1e-5'", "number"]),
    (LLAMA, "rope_theta", "10000", ["rope_theta='10000'", "number"]),
    (LLAMA, "rope_theta", float("nan"), ["rope_theta=nan"]),
    (LLAMA, "tie_word_embeddings", "false", ["tie_word_embeddings='false'", "true or false"]),
    (LLAMA, "rope_scaling", "llama3", ["rope_scaling='llama3'", "JSON object"]),
    (LLAMA, "rope_scaling", {"rope_type": "llama3", "factor": 4.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8}, ["rope_scaling.low_freq_factor", "missing"]),
    (LLAMA, "rope_scaling", {"rope_type": "llama3", "factor": "4", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8}, ["rope_scaling.factor='4'"]),
    (LLAMA, "num_key_value_heads", 3, ["num_attention_heads=2", "num_key_value_heads=3"]),
    (LLAMA, "head_dim", 3, ["head_dim=3", "even"]),
    (LLAMA, "partial_rotary_factor", 0.5, ["partial_rotary_factor=0.5", "not supported"]),
    ({**LLAMA, "model_type": "mistral"}, "sliding_window", "8", ["sliding_window='8'"]),
    (GPT2, "n_inner", 0, ["n_inner=0"]),
    (GPT2, "n_embd", 5, ["n_embd=5", "n_head=2"]),
    (GPT2, "layer_norm_epsilon", "1e-5", ["layer_norm_epsilon='1e-5'"]),
    (GPT2, "tie_word_embeddings", False, ["tie_word_embeddings=False"]),
    (BERT, "type_vocab_size", "2", ["type_vocab_size='2'"]),
    (BERT, "tie_word_embeddings", False, ["tie_word_embeddings=False"]),
]


@pytest.mark.parametrize("base,field,value,fragments", CONFIG_CASES,
                         ids=[f"{b['model_type']}-{f}={'missing' if v is MISSING else repr(v)}"
                              for b, f, v, _ in CONFIG_CASES])
def test_missing_or_mistyped_config_field_is_named(tmp_path, base, field, value, fragments):
    config = {k: v for k, v in base.items() if k != field}
    if value is not MISSING:
        config[field] = value
    d = model_dir(tmp_path / "m", config)
    refused(lambda: hf.load_pretrained(d), os.path.join(d, "config.json"), *fragments)


# ---------------------------------------------------------------------------
# The command line: `error: ...`, exit 2


def hf_dir_with_tokenizer(path, config=LLAMA, weights=None) -> str:
    """model_dir plus a tokenizer.json (made with the `tokenizers` library) whose
    vocabulary fits the 8-token model, and the tokenizer_config.json naming its specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = model_dir(path, config, weights)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "<unk>": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f)
    return d


def experiment_argv(tmp_path, d) -> list[str]:
    sft, prefs = tmp_path / "sft.jsonl", tmp_path / "prefs.jsonl"
    sft.write_text("".join(json.dumps({"prompt": "a b", "response": "b a"}) + "\n" for _ in range(16)))
    prefs.write_text("".join(json.dumps({"prompt": "a", "chosen": "b", "rejected": "a"}) + "\n" for _ in range(16)))
    sets = [f"init_from=hf:{d}", f"sft.data.source=jsonl:{sft}", f"dpo.data.source=jsonl:{prefs}",
            "sft.train.seq_len=8", "dpo.train.seq_len=8", "sft.train.batch_size=8", "dpo.train.batch_size=8",
            "sft.train.steps=1", "dpo.train.steps=1"]
    return ["--workdir", str(tmp_path / "run")] + [x for s in sets for x in ("--set", s)]


def test_experiment_cli_reports_a_bad_config_field(tmp_path):
    """`python -m experiments.llama_sft_dpo --set init_from=hf:DIR` with a mistyped
    config.json field: `error: ...` naming file and field, exit 2, no traceback."""
    d = hf_dir_with_tokenizer(tmp_path / "m", {**LLAMA, "num_hidden_layers": "1"})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "experiments.llama_sft_dpo"] + experiment_argv(tmp_path, d),
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert f"error: {os.path.join(d, 'config.json')}: num_hidden_layers='1'" in out.stderr
    assert "Traceback" not in out.stderr


def test_experiment_reports_a_bad_safetensors_header(tmp_path, capsys):
    """The same path, now past the config to the weights: a negative offset is
    `error: ...` naming file and tensor, exit 2 (in-process through run_main,
    which is what the module's __main__ runs)."""
    from experiments import llama_sft_dpo
    from llm_jax.cli import run as run_main
    tensors = llama_tensors()
    header, offset = {}, 0
    for name, a in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    header["model.norm.weight"]["data_offsets"] = [-16, 0]
    d = hf_dir_with_tokenizer(tmp_path / "m", weights=safetensors_bytes(header, b"".join(
        a.tobytes() for a in tensors.values())))
    assert run_main(lambda: llama_sft_dpo.main(experiment_argv(tmp_path, d))) == 2
    err = capsys.readouterr().err
    assert f"error: {os.path.join(d, 'model.safetensors')}: tensor model.norm.weight" in err, err
    assert "[-16, 0]" in err
