"""Hugging Face interop: import and export GPT-2, Llama-family and BERT checkpoints.

    cfg, params = hf.load_pretrained("path/to/hf_dir")          # config.json + *.safetensors
    hf.save_pretrained("out_dir", cfg, params, tokenizer=tok)   # a directory `transformers` loads
    python -m llm_jax.hf export --workdir runs/x --stage sft --out hf_out

Only local directories, and only `config.json` + safetensors (single file or
sharded with `model.safetensors.index.json`): weights never pass through pickle,
and this module needs neither torch nor transformers. The safetensors format is
read and written here directly (an 8-byte header length, a JSON header, raw
little-endian bytes), memory-mapped, with bfloat16 through `ml_dtypes` (which
JAX ships), so a multi-gigabyte file is never copied whole into memory. What is
read from disk is checked before it is used (the safetensors header against the
format spec, the index's shard paths, each config.json field's type): a malformed
file is an HFError naming the file and the tensor or field, never a wrong read.

Families (`model_type` in config.json) and the llm_jax layout they map to:
    gpt2                 learned positions, LayerNorm, tanh GELU, biases, tied head;
                         Conv1D weights are [in, out]; c_attn holds q|k|v side by side
    llama, mistral       RoPE (half-split, as HF stores it; Llama-3 scaling), RMSNorm,
                         SwiGLU, grouped-query attention; torch Linear weights are [out, in]
    bert                 post-norm encoder, token types, erf GELU, the masked-LM head
                         (BertForMaskedLM; a BertModel checkpoint without the head is
                         read with `init_missing_head=True`, which gives a fresh head)
A checkpoint with a setting this model does not implement (GPT-2's attention
scaled by layer index, Mistral's sliding window shorter than the context, BERT's
relative positions, a RoPE scaling other than Llama 3's ...) is refused with the
setting's name, never loaded into a model that would compute something else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np

from llm_jax import model
from llm_jax.config import ModelConfig
from llm_jax.errors import ConfigError, HFError

Params = dict[str, Any]
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---------------------------------------------------------------------------
# safetensors, read and written directly

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


# The safetensors format caps the header at 100 MB (the reference reader refuses more),
# so a corrupt length field is an error, not a 2^62-byte read.
_MAX_HEADER = 100_000_000
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as read-only memory-mapped numpy arrays.

    The whole header is checked before any byte is mapped, against the safetensors
    format spec: an 8-byte little-endian header length (at most 100 MB, inside the
    file), a UTF-8 JSON object without duplicate keys, each tensor exactly
    {dtype, shape, data_offsets} whose byte range holds prod(shape) elements, the
    ranges tiling the data section with no overlap and no hole, and an optional
    `__metadata__` of strings. Anything else is an HFError naming the file, the
    tensor and the value: a malformed file must never read the wrong bytes."""
    header, data_start, data_len = _read_header(path)
    meta = header.pop("__metadata__", None)  # null: no metadata, as the reference reader takes it
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise HFError(f"{path}: __metadata__ must map strings to strings, got {meta!r}")
    spans = {name: _tensor_span(path, name, entry) for name, entry in header.items()}
    _check_tiling(path, spans, data_len)
    # np.memmap cannot map zero bytes; a data section that holds only empty tensors needs none.
    data = (np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,)) if data_len
            else np.zeros(0, np.uint8))
    return {name: data[begin:end].view(_DTYPES[header[name]["dtype"]]).reshape(header[name]["shape"])
            for name, (begin, end) in spans.items()}


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """json object_pairs_hook: the safetensors format disallows duplicate keys, and
    json.loads would silently keep the last one."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _read_header(path: str) -> tuple[dict, int, int]:
    """(the JSON header, where the data section starts, its length in bytes)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HFError(f"{path}: {size} bytes, shorter than the 8-byte header length "
                              "a safetensors file starts with")
            n = int.from_bytes(prefix, "little")
            if n > _MAX_HEADER:
                raise HFError(f"{path}: header length {n} exceeds the safetensors format's limit of "
                              f"{_MAX_HEADER} bytes (not a safetensors file, or a corrupt one)")
            if 8 + n > size:
                raise HFError(f"{path}: header length {n} runs past the end of the file ({size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise HFError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        # Decoded explicitly: json.loads would also accept UTF-16 or UTF-32 bytes.
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise HFError(f"{path}: the header holds the key {e.args[0]!r} twice "
                      "(the safetensors format disallows duplicate keys)") from None
    except UnicodeDecodeError as e:
        raise HFError(f"{path}: the header is not UTF-8 ({e})") from None
    except ValueError as e:
        raise HFError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise HFError(f"{path}: the header is a JSON {type(header).__name__}, not a JSON object "
                      "of tensor names")
    return header, 8 + n, size - 8 - n


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a dimension


def _tensor_span(path: str, name: str, entry) -> tuple[int, int]:
    """The checked [begin, end) byte range of one header entry."""
    where = f"{path}: tensor {name}"
    if not isinstance(entry, dict):
        raise HFError(f"{where}: expected an object with dtype, shape and data_offsets, got {entry!r}")
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    extra = sorted(k for k in entry if k not in _ENTRY_KEYS)
    if missing or extra:
        raise HFError(f"{where}: " + "; ".join(
            ([f"no {', '.join(missing)}"] if missing else [])
            + ([f"unknown keys {extra} (a safetensors tensor has exactly dtype, shape and data_offsets)"]
               if extra else [])))
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise HFError(f"{where} has dtype {dtype!r}, which is not supported (supported: {', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HFError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise HFError(f"{where}: data_offsets {offsets!r} is not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    need = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize  # Python ints: no overflow
    if end - begin != need:
        raise HFError(f"{where}: data_offsets {offsets} span {end - begin} bytes, but shape {shape} of "
                      f"{dtype} needs {need}")
    return begin, end


def _check_tiling(path: str, spans: dict[str, tuple[int, int]], data_len: int) -> None:
    """The safetensors format requires the byte ranges to cover the data section
    entirely, without holes: sorted by offset, each starts where the one before ends
    and the last ends at the end of the file. So no byte is read as two tensors, and
    none goes unaccounted for (bytes no tensor owns could carry anything)."""
    for name, (begin, end) in spans.items():
        if end > data_len:
            raise HFError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] run past the end of "
                          f"the data section ({data_len} bytes)")
    at, before = 0, None
    for name, (begin, end) in sorted(spans.items(), key=lambda item: item[1]):
        if begin < at:
            raise HFError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] overlaps tensor "
                          f"{before} ({list(spans[before])})")
        if begin > at:
            raise HFError(f"{path}: bytes {at}..{begin} of the data section, before tensor {name}, "
                          "belong to no tensor")
        at, before = end, name
    if at != data_len:
        raise HFError(f"{path}: bytes {at}..{data_len} of the data section, after the last tensor, "
                      "belong to no tensor")


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes `tensors` (name -> array) as one .safetensors file, names sorted."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset, arrays = 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _DTYPE_NAMES:
            raise HFError(f"tensor {name}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())


def read_weights(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of a HF directory: model.safetensors, or the shards its index names."""
    index = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index):
        owner = _read_index(directory, index)
        tensors: dict[str, np.ndarray] = {}
        for path in dict.fromkeys(owner.values()):
            shard = read_safetensors(path)
            _check_shard_matches_index(index, path, shard, owner)
            tensors.update(shard)  # disjoint: each tensor is in the one shard the index names
        return tensors
    if os.path.exists(os.path.join(directory, WEIGHTS_FILE)):
        return read_safetensors(os.path.join(directory, WEIGHTS_FILE))
    found = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    pickles = [f for f in found if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f" (found {pickles}: pickle files are never loaded; convert them to safetensors "
            "with `transformers` first)" if pickles else "")
    raise HFError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def _read_index(directory: str, index: str) -> dict[str, str]:
    """{tensor name: the path of the shard holding it} of model.safetensors.index.json.

    The index is text that chooses which files are read, so each shard it names must
    lie inside `directory` once `..` and symlinked folders are resolved (no absolute
    paths), and must exist. The shard file itself may be a symlink, as
    model.safetensors may: the Hugging Face hub cache stores every file of a snapshot
    as a link into its blobs/ folder, outside the snapshot directory."""
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except UnicodeDecodeError as e:
        raise HFError(f"{index}: not UTF-8 text ({e})") from None
    except (OSError, ValueError) as e:
        raise HFError(f"{index}: not readable JSON ({e})") from None
    except AttributeError:  # a JSON array or value, not an object
        weight_map = None
    if not isinstance(weight_map, dict):
        raise HFError(f"{index}: no weight_map object (tensor name -> shard file), got {weight_map!r}")
    root = os.path.realpath(directory)
    owner = {}
    for name, file in weight_map.items():
        where = f"{index}: tensor {name} is in shard {file!r}"
        if not isinstance(file, str) or not file:
            raise HFError(f"{where}, which is not a file name")
        if os.path.isabs(file):
            raise HFError(f"{where}, an absolute path: shards must be inside {directory}")
        folder = os.path.realpath(os.path.join(directory, os.path.dirname(file)))
        path = os.path.join(folder, os.path.basename(file))
        if os.path.commonpath([root, folder]) != root or os.path.basename(file) in ("", ".", ".."):
            raise HFError(f"{where}, which is outside {directory} (it resolves to {path})")
        if not os.path.isfile(path):
            raise HFError(f"{where}, which does not exist (or is not a file)")
        owner[name] = path
    return owner


def _check_shard_matches_index(index: str, path: str, shard: dict, owner: dict[str, str]) -> None:
    """A shard holds exactly the tensors the index puts in it (`owner`: tensor name ->
    shard path). Otherwise a tensor may sit in two shards (read shard by shard, the
    last copy would win) or the index is stale (written for other files)."""
    absent = sorted(n for n, p in owner.items() if p == path and n not in shard)
    if absent:
        raise HFError(f"{index}: tensor {absent[0]} is in {os.path.basename(path)} by the index, but "
                      f"{path} does not hold it ({len(absent)} such)")
    unlisted = sorted(n for n in shard if owner.get(n) != path)
    if unlisted:
        name = unlisted[0]
        listed = (f"puts it in {os.path.basename(owner[name])}" if name in owner else "does not list it")
        raise HFError(f"{path}: holds tensor {name}, but {index} {listed} ({len(unlisted)} such)")


# ---------------------------------------------------------------------------
# config.json <-> ModelConfig


def read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:  # JSON is UTF-8 whatever the locale
            hf = json.load(f)
    except FileNotFoundError:
        raise HFError(f"{directory}: no {CONFIG_FILE}; is this a Hugging Face model directory?") from None
    except OSError as e:
        raise HFError(f"{path}: cannot be read ({e})") from None
    except UnicodeDecodeError as e:
        raise HFError(f"{path}: not UTF-8 text ({e})") from None
    except ValueError as e:
        raise HFError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise HFError(f"{path}: a JSON {type(hf).__name__}, not the JSON object of a model config")
    return hf


_REQUIRED = object()


class _Fields:
    """Typed reads of a config.json object (or one of its nested objects, `prefix`
    naming it): a key that is missing or holds the wrong type is an HFError naming the
    file, the key and the value, not a KeyError, a TypeError from deep in ModelConfig,
    or a string silently taken for a number or a bool ("false" is truthy). A JSON null
    reads as the default, as transformers reads it."""

    def __init__(self, hf: dict, where: str, prefix: str = ""):
        self.hf, self.where, self.prefix = hf, where, prefix

    def _absent(self, key: str, default):
        """The default of a key that is absent or null, or the HFError of a required one."""
        if default is not _REQUIRED:
            return default
        if key in self.hf:
            raise HFError(f"{self.where}: {self.prefix}{key}=None: a value is required")
        raise HFError(f"{self.where}: {self.prefix}{key} is missing")

    def _bad(self, key: str, value, expected: str) -> HFError:
        return HFError(f"{self.where}: {self.prefix}{key}={value!r}: expected {expected}")

    def int(self, key: str, default=_REQUIRED, minimum: int = 1) -> int:
        value = self.hf.get(key)
        if value is None:
            return self._absent(key, default)
        if not (_is_int(value) and value >= minimum):
            raise self._bad(key, value, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        return value

    def number(self, key: str, default=_REQUIRED, positive: bool = True) -> float:
        value = self.hf.get(key)
        if value is None:
            return self._absent(key, default)
        real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not real or value < 0 or (positive and value == 0):
            raise self._bad(key, value, "a positive number" if positive else "a number >= 0")
        return float(value)

    def bool(self, key: str, default=_REQUIRED) -> bool:
        value = self.hf.get(key)
        if value is None:
            return self._absent(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def object(self, key: str) -> dict:
        value = self.hf.get(key)
        if value is not None and not isinstance(value, dict):
            raise self._bad(key, value, "a JSON object (or null)")
        return dict(value or {})


def _require(hf: dict, where: str, key: str, allowed, default=None) -> None:
    value = hf.get(key, default)
    if value not in allowed:
        raise HFError(f"{where}: {key}={value!r} is not supported by llm_jax (supported: {list(allowed)})")


def _rope_settings(hf: dict, where: str) -> dict:
    """RoPE theta and scaling from either format: `rope_theta` + `rope_scaling`
    (files written before transformers 5) or `rope_parameters` (transformers 5)."""
    top = _Fields(hf, where)
    params, scaling = top.object("rope_parameters"), top.object("rope_scaling")
    in_params, in_scaling = _Fields(params, where, "rope_parameters."), _Fields(scaling, where, "rope_scaling.")

    def fields(key: str) -> _Fields:  # rope_parameters wins, as in `merged` below
        return in_params if key in params else in_scaling

    theta = (in_params if "rope_theta" in params else top).number("rope_theta", 10_000.0)
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    out = {"rope_theta": theta}
    if kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=fields("factor").number("factor"),
                   rope_low_freq_factor=fields("low_freq_factor").number("low_freq_factor"),
                   rope_high_freq_factor=fields("high_freq_factor").number("high_freq_factor"),
                   rope_original_max_len=fields("original_max_position_embeddings").int(
                       "original_max_position_embeddings"))
    elif kind != "default":
        raise HFError(f"{where}: RoPE scaling {kind!r} is not supported by llm_jax "
                      "(supported: none, 'llama3')")
    # Also at the top level: transformers moves a partial_rotary_factor found there into the
    # RoPE parameters.
    for fields_ in (in_params, in_scaling, top):
        partial = fields_.number("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise HFError(f"{where}: {fields_.prefix}partial_rotary_factor={partial} is not supported "
                          "(llm_jax rotates the whole head)")
    return out


def config_from_hf(hf: dict, where: str = CONFIG_FILE) -> ModelConfig:
    """The llm_jax ModelConfig of a HF config.json dict (float32; see `load_pretrained`).
    Every field is read with its type checked (`_Fields`); a combination ModelConfig
    refuses is an HFError naming `where` too."""
    if not isinstance(hf, dict):
        raise HFError(f"{where}: a JSON {type(hf).__name__}, not the JSON object of a model config")
    try:
        return _config_from_hf(hf, where, _Fields(hf, where)).validate()
    except ConfigError as e:
        raise HFError(f"{where}: {e}") from None


def _config_from_hf(hf: dict, where: str, f: _Fields) -> ModelConfig:
    kind = hf.get("model_type")
    if kind == "gpt2":
        _require(hf, where, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("reorder_and_upcast_attn", False), ("add_cross_attention", False),
                        ("tie_word_embeddings", True)):  # GPT2LMHeadModel's head is the embedding
            _require(hf, where, key, (ok,), ok)
        d, n = f.int("n_embd"), f.int("n_head")
        if d % n:
            raise HFError(f"{where}: n_embd={d} is not divisible by n_head={n}")
        return ModelConfig(vocab_size=f.int("vocab_size"), d_model=d, num_layers=f.int("n_layer"),
                           num_heads=n, d_ff=f.int("n_inner", 4 * d), max_len=f.int("n_positions"),
                           positions="learned", norm="layernorm", mlp="gelu", use_bias=True,
                           norm_eps=f.number("layer_norm_epsilon", 1e-5, positive=False), tie_embeddings=True)
    if kind in ("llama", "mistral"):
        _require(hf, where, "hidden_act", ("silu",), "silu")
        _require(hf, where, "attention_bias", (False,), False)
        _require(hf, where, "mlp_bias", (False,), False)
        max_len = f.int("max_position_embeddings")
        window = f.int("sliding_window", None, minimum=0)
        if window is not None and window < max_len:
            raise HFError(f"{where}: sliding_window={window} < max_position_embeddings="
                          f"{max_len}: sliding-window attention is not supported")
        d, n = f.int("hidden_size"), f.int("num_attention_heads")
        kv, head_dim = f.int("num_key_value_heads", n), f.int("head_dim", d // n)
        if n % kv:
            raise HFError(f"{where}: num_attention_heads={n} is not a multiple of num_key_value_heads={kv}")
        if head_dim % 2 or head_dim == 0:
            source = f"head_dim={head_dim}" if "head_dim" in hf else f"hidden_size/num_attention_heads={head_dim}"
            raise HFError(f"{where}: {source}: rotary positions need an even head size")
        return ModelConfig(vocab_size=f.int("vocab_size"), d_model=d, num_layers=f.int("num_hidden_layers"),
                           num_heads=n, num_kv_heads=kv, head_dim=head_dim, d_ff=f.int("intermediate_size"),
                           max_len=max_len, positions="rotary", norm="rmsnorm",
                           norm_eps=f.number("rms_norm_eps", 1e-6, positive=False), mlp="swiglu", use_bias=False,
                           tie_embeddings=f.bool("tie_word_embeddings", False), **_rope_settings(hf, where))
    if kind == "bert":
        _require(hf, where, "hidden_act", ("gelu",), "gelu")
        _require(hf, where, "position_embedding_type", ("absolute",), "absolute")
        _require(hf, where, "is_decoder", (False,), False)
        _require(hf, where, "tie_word_embeddings", (True,), True)  # the masked-LM decoder is the embedding
        d, n = f.int("hidden_size"), f.int("num_attention_heads")
        if d % n:
            raise HFError(f"{where}: hidden_size={d} is not divisible by num_attention_heads={n}")
        return ModelConfig(vocab_size=f.int("vocab_size"), d_model=d, num_layers=f.int("num_hidden_layers"),
                           num_heads=n, d_ff=f.int("intermediate_size"), max_len=f.int("max_position_embeddings"),
                           causal=False, positions="learned", norm="layernorm",
                           norm_eps=f.number("layer_norm_eps", 1e-12, positive=False), norm_position="post",
                           mlp="gelu_exact", use_bias=True, type_vocab_size=f.int("type_vocab_size", 2),
                           lm_head_transform=True, lm_head_bias=True, tie_embeddings=True)
    raise HFError(f"{where}: model_type={kind!r} is not supported (supported: gpt2, llama, mistral, bert)")


# What each family needs of a ModelConfig to be exported as it (field -> value).
_FAMILY_SHAPE = {
    "gpt2": dict(causal=True, positions="learned", norm="layernorm", norm_position="pre", mlp="gelu",
                 use_bias=True, type_vocab_size=0, lm_head_transform=False, lm_head_bias=False,
                 tie_embeddings=True),
    "llama": dict(causal=True, positions="rotary", norm="rmsnorm", norm_position="pre", mlp="swiglu",
                  use_bias=False, type_vocab_size=0, lm_head_transform=False, lm_head_bias=False),
    "bert": dict(causal=False, positions="learned", norm="layernorm", norm_position="post",
                 mlp="gelu_exact", use_bias=True, lm_head_transform=True, lm_head_bias=True,
                 tie_embeddings=True),
}


def family_of(cfg: ModelConfig) -> str:
    """The HF family a config can be exported as, or an HFError that says why none fits."""
    reasons = []
    for family, shape in _FAMILY_SHAPE.items():
        wrong = [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in shape.items() if getattr(cfg, k) != v]
        if family in ("gpt2", "bert"):  # their q, k, v and o weights are all [d_model, d_model]
            if cfg.kv_heads != cfg.num_heads:
                wrong.append(f"num_kv_heads={cfg.num_kv_heads!r} (needs None or num_heads={cfg.num_heads}: "
                             f"{family} has no grouped-query attention)")
            if cfg.head_size * cfg.num_heads != cfg.d_model:
                wrong.append(f"head_dim={cfg.head_dim!r} (needs None or d_model/num_heads="
                             f"{cfg.d_model // cfg.num_heads})")
        if not wrong:
            return family
        reasons.append(f"{family}: model.{', model.'.join(wrong)}")
    raise HFError("this model matches no Hugging Face family llm_jax exports; " + "; ".join(reasons))


def config_to_hf(cfg: ModelConfig, family: str, tokenizer=None) -> dict:
    """The config.json dict of `cfg` as `family` (see `family_of`)."""
    specials = _special_ids(tokenizer)
    dtype = cfg.param_dtype  # "float32" | "bfloat16" (ModelConfig validates it), as HF spells them
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_layer": cfg.num_layers,
                "n_head": cfg.num_heads, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": True,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False, "torch_dtype": dtype, **specials}
    if family == "llama":
        out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
               "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.num_layers,
               "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
               "head_dim": cfg.head_size, "hidden_act": "silu", "max_position_embeddings": cfg.max_len,
               "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
               "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
               "torch_dtype": dtype, **specials}
        if cfg.rope_scaling == "llama3":
            out["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                                   "low_freq_factor": cfg.rope_low_freq_factor,
                                   "high_freq_factor": cfg.rope_high_freq_factor,
                                   "original_max_position_embeddings": cfg.rope_original_max_len}
        return out
    return {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.d_ff, "hidden_act": "gelu",
            "max_position_embeddings": cfg.max_len, "type_vocab_size": max(cfg.type_vocab_size, 1),
            "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute",
            "tie_word_embeddings": True, "torch_dtype": dtype, **specials}


def _special_ids(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


# ---------------------------------------------------------------------------
# Weight layouts. Each family is a pair of functions between HF tensor names and
# the llm_jax params tree (see model.py for its shapes); layers are stacked on L.


class _Reader:
    """Named access to a checkpoint's tensors that says which one is missing or
    misshapen, and remembers which were used (to report those that were not).

    Names are given without the model's prefix: checkpoints differ in it
    ("transformer.h.0" or "h.0", "bert.encoder" or "encoder")."""

    def __init__(self, tensors: dict[str, np.ndarray], where: str, prefix: str, dtype: np.dtype):
        # Each tensor is read straight into the params' storage dtype: through float32, a
        # bfloat16 checkpoint loaded as bfloat16 peaked at 3x its size in host memory.
        # The mappings only reshape, transpose and stack, so the result is the same.
        self.where, self.tensors, self.used, self.dtype = where, tensors, set(), dtype
        self.names = {n[len(prefix):] if n.startswith(prefix) else n: n for n in tensors}

    def has(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.names:
            raise HFError(f"{self.where}: tensor {name} is missing")
        a = self.tensors[self.names[name]]
        if tuple(a.shape) != tuple(shape):
            raise HFError(f"{self.where}: tensor {self.names[name]} has shape {tuple(a.shape)}, "
                          f"the config implies {shape}")
        self.used.add(self.names[name])
        return np.array(a, self.dtype)  # a copy: the params do not hold the memory-mapped files

    def stack(self, pattern: str, layers: int, shape: tuple[int, ...], fn: Callable = lambda a: a) -> np.ndarray:
        """[layers, ...] of fn(tensor) per layer, filled in place (one layer's copy at a time)."""
        first = fn(self(pattern.format(0), shape))
        out = np.empty((layers, *first.shape), first.dtype)
        out[0] = first
        for i in range(1, layers):
            out[i] = fn(self(pattern.format(i), shape))
        return out


def _layer_norm(r: _Reader, name: str, size: int, layers: int = 0) -> Params:
    """A LayerNorm's {"scale", "bias"} from tensors `name`.weight and `name`.bias;
    with `layers` > 0, `name` holds "{}" for the layer index and each is stacked [L, size]."""
    get = (lambda n: r.stack(n, layers, (size,))) if layers else (lambda n: r(n, (size,)))
    return {"scale": get(name + ".weight"), "bias": get(name + ".bias")}


def _gpt2_from_hf(r: _Reader, c: ModelConfig) -> Params:
    L, D, N, H, F = c.num_layers, c.d_model, c.num_heads, c.head_size, c.d_ff
    h = "h.{}."
    qkv = r.stack(h + "attn.c_attn.weight", L, (D, 3 * D))  # [L, D, 3D]: q | k | v
    qkv_b = r.stack(h + "attn.c_attn.bias", L, (3 * D,))
    q, k, v = (qkv[:, :, i * D:(i + 1) * D].reshape(L, D, N, H) for i in range(3))
    qb, kb, vb = (qkv_b[:, i * D:(i + 1) * D].reshape(L, N, H) for i in range(3))

    return {
        "embed": r("wte.weight", (c.vocab_size, D)), "pos_embed": r("wpe.weight", (c.max_len, D)),
        "layers": {
            "attn_norm": _layer_norm(r, h + "ln_1", D, L), "mlp_norm": _layer_norm(r, h + "ln_2", D, L),
            "attn": {"q": q, "k": k, "v": v, "q_bias": qb, "k_bias": kb, "v_bias": vb,
                     "o": r.stack(h + "attn.c_proj.weight", L, (D, D)).reshape(L, N, H, D),
                     "o_bias": r.stack(h + "attn.c_proj.bias", L, (D,))},
            "mlp": {"up": r.stack(h + "mlp.c_fc.weight", L, (D, F)), "up_bias": r.stack(h + "mlp.c_fc.bias", L, (F,)),
                    "down": r.stack(h + "mlp.c_proj.weight", L, (F, D)),
                    "down_bias": r.stack(h + "mlp.c_proj.bias", L, (D,))},
        },
        "final_norm": _layer_norm(r, "ln_f", D),
    }


def _gpt2_to_hf(p: Params, c: ModelConfig) -> dict[str, np.ndarray]:
    L, D = c.num_layers, c.d_model
    a, m = p["layers"]["attn"], p["layers"]["mlp"]
    out = {"transformer.wte.weight": p["embed"], "transformer.wpe.weight": p["pos_embed"],
           "transformer.ln_f.weight": p["final_norm"]["scale"], "transformer.ln_f.bias": p["final_norm"]["bias"]}
    for i in range(L):
        h = f"transformer.h.{i}."
        out[h + "attn.c_attn.weight"] = np.concatenate([a[x][i].reshape(D, D) for x in "qkv"], axis=1)
        out[h + "attn.c_attn.bias"] = np.concatenate([a[x + "_bias"][i].reshape(D) for x in "qkv"])
        out[h + "attn.c_proj.weight"] = a["o"][i].reshape(D, D)
        out[h + "attn.c_proj.bias"] = a["o_bias"][i]
        out[h + "mlp.c_fc.weight"], out[h + "mlp.c_fc.bias"] = m["up"][i], m["up_bias"][i]
        out[h + "mlp.c_proj.weight"], out[h + "mlp.c_proj.bias"] = m["down"][i], m["down_bias"][i]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[h + theirs + ".weight"] = p["layers"][ours]["scale"][i]
            out[h + theirs + ".bias"] = p["layers"][ours]["bias"][i]
    return out


def _llama_from_hf(r: _Reader, c: ModelConfig) -> Params:
    L, D, N, G, H, F = c.num_layers, c.d_model, c.num_heads, c.kv_heads, c.head_size, c.d_ff
    h = "layers.{}."
    # torch Linear weights are [out, in]; ours are [in, out...].
    params = {
        "embed": r("embed_tokens.weight", (c.vocab_size, D)),
        "layers": {
            "attn_norm": {"scale": r.stack(h + "input_layernorm.weight", L, (D,))},
            "mlp_norm": {"scale": r.stack(h + "post_attention_layernorm.weight", L, (D,))},
            "attn": {"q": r.stack(h + "self_attn.q_proj.weight", L, (N * H, D), lambda w: w.T.reshape(D, N, H)),
                     "k": r.stack(h + "self_attn.k_proj.weight", L, (G * H, D), lambda w: w.T.reshape(D, G, H)),
                     "v": r.stack(h + "self_attn.v_proj.weight", L, (G * H, D), lambda w: w.T.reshape(D, G, H)),
                     "o": r.stack(h + "self_attn.o_proj.weight", L, (D, N * H), lambda w: w.T.reshape(N, H, D))},
            "mlp": {"up": r.stack(h + "mlp.up_proj.weight", L, (F, D), np.transpose),
                    "gate": r.stack(h + "mlp.gate_proj.weight", L, (F, D), np.transpose),
                    "down": r.stack(h + "mlp.down_proj.weight", L, (D, F), np.transpose)},
        },
        "final_norm": {"scale": r("norm.weight", (D,))},
    }
    if not c.tie_embeddings:
        params["lm_head"] = r("lm_head.weight", (c.vocab_size, D)).T
    return params


def _llama_to_hf(p: Params, c: ModelConfig) -> dict[str, np.ndarray]:
    L, D, N, G, H = c.num_layers, c.d_model, c.num_heads, c.kv_heads, c.head_size
    a, m = p["layers"]["attn"], p["layers"]["mlp"]
    out = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    if not c.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"].T
    for i in range(L):
        h = f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = p["layers"]["attn_norm"]["scale"][i]
        out[h + "post_attention_layernorm.weight"] = p["layers"]["mlp_norm"]["scale"][i]
        out[h + "self_attn.q_proj.weight"] = a["q"][i].reshape(D, N * H).T
        out[h + "self_attn.k_proj.weight"] = a["k"][i].reshape(D, G * H).T
        out[h + "self_attn.v_proj.weight"] = a["v"][i].reshape(D, G * H).T
        out[h + "self_attn.o_proj.weight"] = a["o"][i].reshape(N * H, D).T
        for x in ("up", "gate", "down"):
            out[h + f"mlp.{x}_proj.weight"] = m[x][i].T
    return out


# BERT checkpoints from before PyTorch used LayerNorm.gamma/beta for weight/bias.
_BERT_RENAMES = (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))


def _bert_from_hf(r: _Reader, c: ModelConfig, init_missing_head: bool) -> Params:
    L, D, N, H, F, V = c.num_layers, c.d_model, c.num_heads, c.head_size, c.d_ff, c.vocab_size
    h = "encoder.layer.{}."

    def dense(name, shape_out_in, fn):
        return (r.stack(h + name + ".weight", L, shape_out_in, fn),
                r.stack(h + name + ".bias", L, (shape_out_in[0],)))

    qkv = {x: dense(f"attention.self.{name}", (D, D), lambda w: w.T.reshape(D, N, H))
           for x, name in (("q", "query"), ("k", "key"), ("v", "value"))}
    o, o_bias = dense("attention.output.dense", (D, D), lambda w: w.T.reshape(N, H, D))
    up, up_bias = dense("intermediate.dense", (F, D), np.transpose)
    down, down_bias = dense("output.dense", (D, F), np.transpose)
    attn = {"o": o, "o_bias": o_bias}
    for x, (w, b) in qkv.items():
        attn[x], attn[x + "_bias"] = w, b.reshape(L, N, H)
    params = {
        "embed": r("embeddings.word_embeddings.weight", (V, D)),
        "pos_embed": r("embeddings.position_embeddings.weight", (c.max_len, D)),
        "type_embed": r("embeddings.token_type_embeddings.weight", (c.type_vocab_size, D)),
        "embed_norm": _layer_norm(r, "embeddings.LayerNorm", D),
        "layers": {"attn_norm": _layer_norm(r, h + "attention.output.LayerNorm", D, L),
                   "mlp_norm": _layer_norm(r, h + "output.LayerNorm", D, L),
                   "attn": attn, "mlp": {"up": up, "up_bias": up_bias, "down": down, "down_bias": down_bias}},
    }
    t = "cls.predictions."
    if r.has(t + "transform.dense.weight"):
        params["lm_transform"] = {"kernel": r(t + "transform.dense.weight", (D, D)).T,
                                  "bias": r(t + "transform.dense.bias", (D,)),
                                  "norm": _layer_norm(r, t + "transform.LayerNorm", D)}
        bias = t + "bias" if r.has(t + "bias") else t + "decoder.bias"
        params["lm_bias"] = r(bias, (V,))
    elif not init_missing_head:
        raise HFError(f"{r.where}: no masked-LM head (cls.predictions.*): a BertModel checkpoint; "
                      "pass init_missing_head=True for a freshly initialised head (e.g. to fine-tune a classifier)")
    return params


def _bert_to_hf(p: Params, c: ModelConfig) -> dict[str, np.ndarray]:
    L, D = c.num_layers, c.d_model
    a, m, b = p["layers"]["attn"], p["layers"]["mlp"], "bert."
    type_embed = p.get("type_embed", np.zeros((1, D), np.float32))  # HF's BERT always adds one
    out = {b + "embeddings.word_embeddings.weight": p["embed"],
           b + "embeddings.position_embeddings.weight": p["pos_embed"],
           b + "embeddings.token_type_embeddings.weight": type_embed,
           b + "embeddings.LayerNorm.weight": p["embed_norm"]["scale"],
           b + "embeddings.LayerNorm.bias": p["embed_norm"]["bias"],
           "cls.predictions.transform.dense.weight": p["lm_transform"]["kernel"].T,
           "cls.predictions.transform.dense.bias": p["lm_transform"]["bias"],
           "cls.predictions.transform.LayerNorm.weight": p["lm_transform"]["norm"]["scale"],
           "cls.predictions.transform.LayerNorm.bias": p["lm_transform"]["norm"]["bias"],
           "cls.predictions.bias": p["lm_bias"]}
    for i in range(L):
        h = f"{b}encoder.layer.{i}."
        for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
            out[h + f"attention.self.{name}.weight"] = a[x][i].reshape(D, D).T
            out[h + f"attention.self.{name}.bias"] = a[x + "_bias"][i].reshape(D)
        out[h + "attention.output.dense.weight"] = a["o"][i].reshape(D, D).T
        out[h + "attention.output.dense.bias"] = a["o_bias"][i]
        out[h + "intermediate.dense.weight"], out[h + "intermediate.dense.bias"] = m["up"][i].T, m["up_bias"][i]
        out[h + "output.dense.weight"], out[h + "output.dense.bias"] = m["down"][i].T, m["down_bias"][i]
        for ours, theirs in (("attn_norm", "attention.output.LayerNorm"), ("mlp_norm", "output.LayerNorm")):
            out[h + theirs + ".weight"] = p["layers"][ours]["scale"][i]
            out[h + theirs + ".bias"] = p["layers"][ours]["bias"][i]
    return out


# Tensors a checkpoint may hold that carry no weights of ours: causal-mask and
# position-id buffers, rotary caches, the tied output matrix, BERT's pooler (a
# classification head this model does not have).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids", "rotary_emb.inv_freq")
_IGNORED_PREFIXES = ("pooler.", "bert.pooler.", "cls.seq_relationship.")


def _ignored(name: str, cfg: ModelConfig) -> bool:
    if name.endswith(_IGNORED_SUFFIXES) or name.startswith(_IGNORED_PREFIXES):
        return True
    tied_head = ("lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    return cfg.tie_embeddings and name in tied_head


# ---------------------------------------------------------------------------
# Public API


def load_pretrained(directory: str, *, param_dtype: str = "float32",
                    init_missing_head: bool = False, rng_seed: int = 0) -> tuple[ModelConfig, Params]:
    """(ModelConfig, params as numpy arrays) of a local HF directory.

    Every tensor is checked against the shape its config implies; a tensor the
    mapping does not use (other than known buffers) is an error, since it means
    the checkpoint computes something this model would not. `param_dtype` is the
    storage dtype of the returned params (the config's `param_dtype` too);
    everything else about compute (dtype, remat, ...) is for the caller to set
    with `dataclasses.replace`."""
    hf = read_config(directory)
    where = os.path.join(directory, CONFIG_FILE)
    cfg = dataclasses.replace(config_from_hf(hf, where), param_dtype=param_dtype)
    tensors = read_weights(directory)
    if hf["model_type"] == "bert":
        tensors = {_rename(n): a for n, a in tensors.items()}
    family = "llama" if hf["model_type"] in ("llama", "mistral") else hf["model_type"]
    dt = np.dtype(param_dtype if param_dtype != "bfloat16" else ml_dtypes.bfloat16)
    r = _Reader(tensors, directory, {"gpt2": "transformer.", "llama": "model.", "bert": "bert."}[family], dt)
    if family == "gpt2":
        params = _gpt2_from_hf(r, cfg)
    elif family == "llama":
        params = _llama_from_hf(r, cfg)
    else:
        params = _bert_from_hf(r, cfg, init_missing_head)
        if "lm_transform" not in params:  # a fresh masked-LM head, as model.init would make it
            params = _fresh_head(cfg, params, rng_seed)
    unused = sorted(n for n in tensors if n not in r.used and not _ignored(n, cfg))
    if unused:
        raise HFError(f"{directory}: {len(unused)} tensors this llm_jax config does not use, e.g. "
                      f"{unused[:5]}: the checkpoint's architecture differs from {family}'s")
    return cfg, jax.tree.map(lambda a: np.asarray(a, dt), params)  # the fresh BERT head is float32


def _rename(name: str) -> str:
    for old, new in _BERT_RENAMES:
        name = name.replace(old, new)
    return name


def _fresh_head(cfg: ModelConfig, params: Params, seed: int) -> Params:
    fresh = model.init(dataclasses.replace(cfg, num_layers=1), jax.random.PRNGKey(seed))
    return {**params, "lm_transform": jax.tree.map(np.asarray, fresh["lm_transform"]),
            "lm_bias": np.asarray(fresh["lm_bias"])}


def hf_weights(cfg: ModelConfig, params: Params) -> tuple[str, dict[str, np.ndarray]]:
    """(family, HF tensor name -> numpy array) of llm_jax params."""
    family = family_of(cfg)
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    fn = {"gpt2": _gpt2_to_hf, "llama": _llama_to_hf, "bert": _bert_to_hf}[family]
    tensors = {n: np.ascontiguousarray(a) for n, a in fn(host, cfg).items()}
    return family, tensors


def save_pretrained(directory: str, cfg: ModelConfig, params: Params, tokenizer=None) -> str:
    """Writes config.json + model.safetensors (+ the tokenizer's files, when it has
    a `save_hf`) so that `transformers.AutoModelFor...from_pretrained(directory)`
    loads the same model. Returns the family it was written as."""
    family, tensors = hf_weights(cfg, params)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(cfg, family, tokenizer), f, indent=2)
    write_safetensors(os.path.join(directory, WEIGHTS_FILE), tensors)
    if tokenizer is not None and hasattr(tokenizer, "save_hf"):
        tokenizer.save_hf(directory)
    return family


def resize_vocab(cfg: ModelConfig, params: Params, vocab_size: int) -> tuple[ModelConfig, Params]:
    """Grows the vocabulary to `vocab_size` (a tokenizer that added tokens, e.g. the
    SFT template's <prompt>/<response>): new embedding rows (and output columns,
    biases) are the mean of the existing ones, so a new token starts as an average
    token rather than noise."""
    old = cfg.vocab_size
    if vocab_size < old:
        raise HFError(f"resize_vocab: cannot shrink the vocabulary from {old} to {vocab_size}")
    if vocab_size == old:
        return cfg, params
    grow = vocab_size - old

    def extend(a, axis):
        a = np.asarray(a)
        mean = a.mean(axis=axis, keepdims=True).astype(a.dtype)
        return np.concatenate([a, np.repeat(mean, grow, axis=axis)], axis=axis)

    params = dict(params, embed=extend(params["embed"], 0))
    if "lm_head" in params:
        params["lm_head"] = extend(params["lm_head"], 1)
    if "lm_bias" in params:
        params["lm_bias"] = extend(params["lm_bias"], 0)
    return dataclasses.replace(cfg, vocab_size=vocab_size), params


# ---------------------------------------------------------------------------
# CLI: export a stage of a run


def export_stage(workdir: str, stage: str, out: str, step: int | None = None) -> str:
    """Writes the LM of `workdir/stage` (its final checkpoint, or `step`'s) as a HF
    directory `out`, with the run's tokenizer. Returns the family written."""
    from llm_jax.generate import load_stage
    cfg, params, tok, _ = load_stage(workdir, stage, step, decoder_only=False)
    return save_pretrained(out, cfg, params, tokenizer=tok)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_jax.hf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a run's stage as a Hugging Face directory")
    ex.add_argument("--workdir", required=True)
    ex.add_argument("--stage", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--step", type=int, default=None)
    args = parser.parse_args(argv)
    from llm_jax.checkpoint import CheckpointError
    from llm_jax.config import ConfigError
    try:
        family = export_stage(args.workdir, args.stage, args.out, args.step)
    except (HFError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out is a file, unwritable, or the disk is full
        print(f"error: --out {args.out}: {e.strerror}: {e.filename or args.out}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "family": family}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
