"""Sources by name: every one becomes a random-access sequence of raw records.

    builtin:NAME[/TASK,TASK...]   generated in-process: NAME in pretrain | sft | chat | preferences
                                  | classify (chat: instructions mixed with requests/thanks/questions
                                  answered well or badly, see `preferences.chat_record`; classify:
                                  labelled `query -> answer` lines, see `data.classify`); optional
                                  subset of tasks (or preference kinds, or classes); splits train | eval
    tfds:NAME[/CONFIG][:VERSION]  a TFDS catalog dataset prepared as ArrayRecord in `data_dir`
                                  (a local path or gs:// bucket); any TFDS split string
    jsonl:PATH                    one JSON object per line (see `records`)
    text:PATH                     one pretraining document per blank-line-separated paragraph

Local files are built once into a TFDS ArrayRecord dataset (`local.prepare`)
and then read exactly like a catalog dataset; their only split is "train"
(TFDS slicing such as "train[:90%]" works). A source's kind (pretrain, sft,
preferences, classification) is given by the config, or implied: builtin by its name, text by
its format, jsonl and tfds by the fields of their first record (never classification, which
is asked for by name). A given kind is the one the stage needs: a source whose records lack
its fields is a DataError naming the source, the kind it holds and the kind needed.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from llm_jax.data import builtin, classify, local, preferences
from llm_jax.data.errors import DataError, SkipReport
from llm_jax.data.records import KINDS, check_file, check_kind, first_json_object, has_fields, wrong_kind

BUILTIN_KINDS = {"pretrain": "pretrain", "sft": "sft", "chat": "sft", "preferences": "preferences",
                 "classify": "classification"}
BUILTIN_EVAL_FRACTION = 10  # eval split = size // 10 records (at least 100)


@dataclasses.dataclass(frozen=True)
class Source:
    """Raw records by index, the kind they make, and what was skipped building them."""

    name: str
    kind: str
    records: Sequence
    build_report: SkipReport = dataclasses.field(default_factory=SkipReport)

    def place(self, index: int, record=None) -> str:
        """Where record `index` came from, for messages: file:line or source[index]."""
        line = record.get("line") if isinstance(record, dict) else None
        if line is not None and self.name.split(":", 1)[0] in local.READERS:
            return f"{self.name.split(':', 1)[1]}:{int(line)}"
        return f"{self.name}[{index}]"


class BuiltinRecords(Sequence):
    """Record i of a built-in split is generated from its own seeded RNG: random
    access in O(1), the same on every host, no file."""

    def __init__(self, name: str, split: str, size: int, seed: int, subset: tuple[str, ...] | None):
        if split not in builtin.SPLITS:
            raise DataError(f"builtin:{name}: split {split!r}; expected one of {builtin.SPLITS}")
        self.name, self.split, self.seed, self.subset = name, split, seed, subset
        self.size = size if split == "train" else max(100, size // BUILTIN_EVAL_FRACTION)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(i)
        rng = random.Random(f"{self.seed}:{self.name}:{self.split}:{i}")
        if self.name == "pretrain":
            return builtin.pretrain_record(rng, self.split, self.subset)
        if self.name == "sft":
            return builtin.sft_record(rng, self.split, self.subset)
        if self.name == "chat":
            return preferences.chat_record(rng, self.split, self.subset)
        if self.name == "classify":
            return classify.classification_record(rng, self.split, self.subset)
        return preferences.preference_record(rng, self.split, self.subset)


def _open_builtin(spec: str, split: str, size: int, seed: int) -> Source:
    name, _, subset = spec.partition("/")
    if name not in BUILTIN_KINDS:
        raise DataError(f"builtin:{spec}: unknown built-in source {name!r}; known: {sorted(BUILTIN_KINDS)}")
    known = {"preferences": preferences.PREFERENCE_KINDS,
             "classify": classify.CLASSES, "pretrain": tuple(builtin.PRETRAIN_TASKS)}.get(name, tuple(builtin.TASKS))
    parts = tuple(p for p in subset.split(",") if p) or None
    for p in parts or ():
        if p not in known:
            raise DataError(f"builtin:{spec}: unknown task {p!r}; known: {sorted(known)}")
    if size < 1:
        raise DataError(f"builtin:{spec}: size={size} must be positive")
    return Source(f"builtin:{spec}", BUILTIN_KINDS[name], BuiltinRecords(name, split, size, seed, parts))


def _infer_kind(raw, name: str) -> str:
    fields = raw.keys() if isinstance(raw, dict) else ()
    # Never "classification": {"text", "label"} records are also a pretraining corpus
    # that carries labels (tfds:imdb_reviews), read as such before that kind existed;
    # a classification stage asks for its kind (DataConfig.kind).
    for kind in ("preferences", "sft", "pretrain"):  # the most specific first
        if all(f in fields for f in KINDS[kind]):
            return kind
    raise DataError(f"{name}: cannot tell the record kind from the first record's fields "
                    f"{sorted(fields)}; set the data kind to one of {sorted(KINDS)}")


def _open_tfds(spec: str, split: str, data_dir: str | None, download: bool):
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(spec, split=split, data_dir=data_dir, download=download,
                                builder_kwargs={"file_format": "array_record"})
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"tfds:{spec}: no such dataset in the TFDS catalog (data_dir={data_dir})") from None
    except Exception as e:  # not prepared, not ArrayRecord, no network, bad split...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"tfds:{spec}: split {split!r} is not prepared as ArrayRecord in data_dir={data_dir} "
            f"and could not be {'downloaded' if download else 'read (download is off)'}: {first}. "
            f"Prepare it once with `tfds build {spec.split('/')[0]} --file_format=array_record "
            f"--data_dir={data_dir or '~/tensorflow_datasets'}`") from None


def open_source(source: str, *, split: str = "train", kind: str | None = None, seed: int = 0,
                size: int = 10_000, data_dir: str | None = None, cache_dir: str = "~/.cache/llm_jax/data",
                download: bool = False) -> Source:
    """Opens a source by name (see the module docstring); raises DataError naming it."""
    scheme, sep, spec = source.partition(":")
    if not sep or not spec:
        raise DataError(f"source {source!r}: expected SCHEME:NAME with SCHEME in builtin, tfds, jsonl, text")
    # A given kind is what the stage needs. A source whose records lack one of its fields
    # stops here, before anything trains, naming what the source holds (see `wrong_kind`);
    # a jsonl file is checked line by line and stops when no line has the fields (`local.prepare`).
    if kind is not None:
        check_kind(kind)
    if scheme == "builtin":
        src = _open_builtin(spec, split, size, seed)
        if kind is not None and not has_fields(src.kind, kind):
            raise DataError(wrong_kind(source, src.kind, kind))
        src = dataclasses.replace(src, kind=kind or src.kind)
    elif scheme == "tfds":
        records = _open_tfds(spec, split, data_dir, download)
        if len(records) == 0:
            raise DataError(f"{source}: split {split!r} is empty")
        # Every record of a TFDS dataset has the same features: the first one's are all of them.
        if kind is not None and not has_fields(records[0], kind):
            raise DataError(wrong_kind(source, records[0], kind))
        src = Source(source, kind or _infer_kind(records[0], source), records)
    elif scheme in local.READERS:
        if scheme == "text" and kind is not None and not has_fields("pretrain", kind):
            raise DataError(wrong_kind(source, "pretrain", kind) + "; plain text makes only pretraining "
                            "records, use a jsonl file")
        if kind is None:
            kind = "pretrain" if scheme == "text" else _first_jsonl_kind(spec)
        root, report = local.prepare(scheme, spec, kind, cache_dir)
        try:
            records = local.data_source(root, kind, split)
        except Exception as e:
            raise DataError(f"{source}: cannot read split {split!r} of its built dataset at {root}: {e}") from None
        src = Source(source, kind, records, report)
    else:
        raise DataError(f"source {source!r}: unknown scheme {scheme!r}; expected builtin, tfds, jsonl or text")
    return src


def _first_jsonl_kind(path: str) -> str:
    """The kind implied by the first line that is a JSON object."""
    check_file(path)
    obj = first_json_object(path)  # a line that cannot be read is passed over (and later skipped)
    if obj is not None:
        return _infer_kind(obj, f"jsonl:{path}")
    raise DataError(f"jsonl:{path}: no line is a JSON object; cannot tell the record kind")
