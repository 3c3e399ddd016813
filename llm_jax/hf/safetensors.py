"""safetensors files, read and written here directly: one file, or a directory's
shards named by `model.safetensors.index.json`.

The format (https://huggingface.co/docs/safetensors) is an 8-byte little-endian
header length, a JSON header, then raw little-endian bytes. Files are
memory-mapped, with bfloat16 through `ml_dtypes` (which JAX ships), so a
multi-gigabyte file is never copied whole into memory, and weights never pass
through pickle. What is read from disk is checked before it is used (the header
against the format spec, the index's shard paths): a malformed file is an HFError
naming the file and the tensor, never a wrong read.

Why not the `safetensors` package: checked with safetensors 0.8.0, its numpy
reader (`safe_open(path, framework="np")`, `safetensors.numpy.load_file`) does
read bfloat16 without torch now. It stays a test-only dependency (tests/test_hf.py
checks this reader and writer against it) because, on the malformed headers of
tests/test_hf_reader.py, it accepts two (a tensor named twice, of which it keeps
one silently; an entry with a key the format does not define, "byte_order": "big",
which it ignores) and its errors name neither the file nor, mostly, the tensor or
the value ("invalid shape, data type, or offset for tensor"). Those checks and
their messages are what this module is for; reading the bytes is four lines of numpy.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from llm_jax.errors import HFError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

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


def is_int(x) -> bool:
    """Whether a parsed JSON value is an integer: Python's bool is an int, but JSON
    true is not a dimension, an offset or a config count."""
    return isinstance(x, int) and not isinstance(x, bool)


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
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise HFError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
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

