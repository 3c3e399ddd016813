"""Local files (`jsonl:PATH`, `text:PATH`) built once into a TFDS ArrayRecord dataset.

The file is parsed and checked once, its usable records are written by a small
`tfds.core.GeneratorBasedBuilder` in the ArrayRecord format, and every later
read is random access through `as_data_source` (no TensorFlow is imported).
The dataset lives in `cache_dir/<format>-<kind>-<file name>-<content hash>/`,
so editing the file builds a new one and an unchanged file is never rebuilt.
Skipped records are counted at build time and stored next to the dataset
(`skipped.json`), so every process and every resumed run reports the same.

On several hosts each process builds its own copy when `cache_dir` is local;
on a shared `cache_dir` TFDS writes to a temporary folder and renames it, so
a concurrent build by another host is harmless.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from llm_jax.data.errors import DataError, SkipReport
from llm_jax.data.records import (INT_FIELDS, KINDS, first_json_object, has_fields, read_jsonl, read_text,
                                  wrong_kind)

READERS = {"jsonl": read_jsonl, "text": read_text}
SKIPPED_FILE = "skipped.json"


class LlmJaxLocal(tfds.core.GeneratorBasedBuilder):
    """One local file's checked records; one builder config per record kind."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=kind) for kind in KINDS]

    # TFDS 4.9 looks up a builder's source file through `importlib_resources`,
    # which it only declares for Python < 3.9; naming the file here avoids it.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return epath.Path(__file__)

    def __init__(self, *, records: list[tuple[int, dict]] | None = None, **kwargs):
        self._records = records or []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        fields = {f: np.int64 if f in INT_FIELDS else tfds.features.Text()
                  for f in KINDS[self.builder_config.name]}
        # "line" travels with the record so later problems (too long for the
        # context) can still be reported with the file's line number.
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {**fields, "line": np.int64}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        fields = KINDS[self.builder_config.name]
        for line, rec in self._records:
            yield line, {**{f: rec[f] for f in fields}, "line": line}


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def prepare(fmt: str, path: str, kind: str, cache_dir: str) -> tuple[str, SkipReport]:
    """Builds (once) the dataset of `path`; returns (its directory, skip report).

    Raises DataError when the file is missing or empty or has no usable record."""
    if fmt not in READERS:
        raise DataError(f"unknown local format {fmt!r}")
    if not os.path.isfile(path):
        raise DataError(f"{fmt}:{path}: no such file")
    name = f"{fmt}-{kind}-{os.path.basename(path)}-{file_hash(path)}"
    root = os.path.join(os.path.expanduser(cache_dir), name)
    report_path = os.path.join(root, SKIPPED_FILE)
    if os.path.exists(report_path):
        with open(report_path) as f:
            return root, SkipReport.from_dict(json.load(f))

    report, records = SkipReport(), []
    for line, rec in READERS[fmt](path, kind):
        if isinstance(rec, str):
            report.add(rec, f"{path}:{line}")
        else:
            records.append((line, rec))
    if not records:
        why = f"no usable {kind} record (fields {list(KINDS[kind])}); skipped: {report.summary()}"
        # Most often the file is of another kind (SFT given preference pairs): say so first.
        sample = first_json_object(path) if fmt == "jsonl" else None
        if sample is not None and not has_fields(sample, kind):
            raise DataError(f"{wrong_kind(f'{fmt}:{path}', sample, kind)}: {why}")
        raise DataError(f"{fmt}:{path}: {why}")
    builder = LlmJaxLocal(records=records, config=kind, data_dir=root, file_format="array_record")
    builder.download_and_prepare()
    with open(report_path + ".tmp", "w") as f:
        json.dump(report.to_dict(), f)
    os.replace(report_path + ".tmp", report_path)  # written last: its presence means "built"
    return root, report


def data_source(root: str, kind: str, split: str):
    """The random-access ArrayRecord source of a dataset built by `prepare`."""
    builder = tfds.builder_from_directory(os.path.join(root, "llm_jax_local", kind, "1.0.0"))
    return builder.as_data_source(split=split)
