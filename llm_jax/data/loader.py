"""`Loader`: host-local packed numpy batches from a named source, resumable exactly.

The record stream is a Grain `MapDataset`: record indices, this process's
shard of them (`[shard_index::shard_count]`, by default the JAX process
index), shuffled by seed with a fresh permutation every epoch, repeated
without end, and mapped to checked, tokenized examples. Because a MapDataset
is random access, the stream's position is a single integer, and the loader's
whole state is that position, the chunk inside the current record, the few
examples waiting to be packed, and counters: `get_state()` is a small JSON-able
dict and `set_state()` on a fresh loader continues with exactly the batches an
uninterrupted run would see. On several hosts every process keeps its own
state (its own shard); restoring needs the same number of processes.

A batch holds `batch_size // shard_count` rows (this process's part of the
global batch; the caller places it with `sharding.shard_batch`). Examples are
packed first-fit in stream order; one that fits in no row waits ("pending")
and is placed first in the next batch; a batch is done when its rows are full
or `pack_lookahead` examples wait. A long pretraining document yields several
chunks (`formats`), and `chunk` counts those of the current record already
taken from the stream.

Batches:
    pretrain / sft:  inputs, targets, weights, positions, segment_ids     [rows, seq_len]
    preferences:     chosen_{same five}, rejected_{same five}             [rows, seq_len]
                     pair_mask                                            [rows, max_segments]
    classification:  the five of pretrain                                 [rows, seq_len]
                     labels (int32), label_mask                           [rows, max_segments]

In a classification batch `labels[r, s]` is the class of the sequence with
segment id s + 1 in row r, and `label_mask[r, s]` marks the sequences that
exist. With `num_classes` set, a label >= num_classes stops the run with a
DataError naming the record's file:line: it means the data has more classes
than the head, which skipping would hide by dropping a whole class.

Records are skipped at two times and counted as one number: those a local
file lost when it was built (all of the file, known before the first step and
printed in one line when the loader starts) plus those found while reading
this loader's shards (too long for the context, ...). `stats["skipped"]` holds
both, so `data_skipped` in metrics.jsonl counts every record left out (with
several processes: process 0's shards, plus the whole file's build skips);
"skipped_when_built" and "skipped_when_read" keep the two apart.
"""

from __future__ import annotations

import collections
import dataclasses
import typing
from typing import Any

import grain
import jax
import numpy as np

from llm_jax.data.errors import DataError, SkipReport
from llm_jax.data.formats import to_examples
from llm_jax.data.packing import PAIR_PREFIXES, FirstFit, empty_batch, write
from llm_jax.data.records import check_record
from llm_jax.data.sources import Source, open_source
from llm_jax.rundir import say

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where records come from and how they become batches."""

    source: str = "builtin:pretrain"  # see llm_jax.data.sources
    split: str = "train"
    # Tokens per row and global rows per step (over all processes). A stage of an
    # experiment leaves both unset: they come from its train.seq_len/batch_size.
    seq_len: int | None = None
    batch_size: int | None = None
    seed: int = 0  # shuffling, and the built-in world's generator
    # The record kind the stage needs (pretrain | sft | preferences | classification), set by
    # the experiment for each stage: a source without those fields stops before training.
    # None: implied by the source.
    kind: str | None = None
    data_dir: str | None = None  # tfds: where prepared datasets live (may be gs://)
    cache_dir: str = "~/.cache/llm_jax/data"  # jsonl/text: where their datasets are built
    size: int = 10_000  # builtin: train records (eval: size // 10, at least 100)
    max_segments: int = 16  # sequences per row at most; the static width of per-sequence scores
    shuffle: bool = True
    num_epochs: int | None = None  # None: endless; 1: one pass (evaluation), last batch padded
    download: bool = False  # tfds: download and prepare when not found in data_dir
    pack_lookahead: int = 16  # examples that may wait for a later batch when they fit no row
    num_classes: int = 0  # classification: labels must be < this (0: not checked)

    def validate(self) -> "DataConfig":
        for name in ("seq_len", "batch_size", "max_segments", "pack_lookahead"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DataError(f"data.{name}={getattr(self, name)} must be positive")
        if self.num_classes < 0:
            raise DataError(f"data.num_classes={self.num_classes} must be >= 0 (0: labels not checked)")
        return self

    def for_loader(self) -> "DataConfig":
        """Validated, with the row length and count a loader needs set."""
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) is None:
                raise DataError(f"data.{name} is not set: a loader needs rows of a known length and "
                                "count (a stage sets them from its train.seq_len and train.batch_size)")
        return self.validate()


def check_stage_data(config: DataConfig, kind: str) -> None:
    """Opens a stage's source as `kind` records: a source of another kind (or missing,
    unreadable, empty) is a DataError now, before an earlier stage spends its time."""
    c = config
    open_source(c.source, split=c.split, kind=kind, seed=c.seed, size=c.size, data_dir=c.data_dir,
                cache_dir=c.cache_dir, download=c.download)


class StageLoader(typing.Protocol):
    """What the stage loop (`loop.run_stage`) needs from a stage's batches.

    Every stage's loader follows it: `ShardedLoader` (records -> packed rows) and
    the wrappers beside each stage that add to its batches (`stages.mlm.MaskingLoader`,
    `stages.dpo.CachedReferenceLoader`), and `stages.ppo.PromptLoader`."""

    def __next__(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch."""

    def get_state(self) -> dict:
        """This process's position, JSON-able (saved with every checkpoint)."""

    def set_state(self, state: dict) -> None:
        """Continue from a position `get_state` gave."""

    # Optional (the loop falls back to `restore_per_process`, and to logging no data counts):

    def restore(self, states: list[dict]) -> None:
        """Continue from a checkpoint holding every saving process's state, in process
        order; a loader that cannot resume on another process count says so."""

    @property
    def stats(self) -> dict:
        """What it counted: "skipped" {reason: count}, "truncated", "packing_efficiency"
        (logged as data_skipped, data_truncated, packing_efficiency)."""


class LoaderWrapper:
    """A loader that adds to the batches of another (`self.loader`): what it counted
    is the inner loader's."""

    loader: Any

    def __iter__(self):
        return self

    @property
    def stats(self) -> dict:
        return getattr(self.loader, "stats", {})


def restore_per_process(loader, states: list[dict]) -> None:
    """`restore` for a loader whose state belongs to one process: its own entry,
    which exists only when as many processes saved as run now."""
    if len(states) != jax.process_count():
        raise DataError(f"the checkpoint holds data positions for {len(states)} processes, but "
                        f"{jax.process_count()} are running; resume with the same number of processes "
                        "(this stage's data stream is split per process)")
    loader.set_state(states[jax.process_index()])


_ANNOUNCED: set[tuple[str, str]] = set()  # (source, report) lines printed by this process


def _announce_build_skips(source: Source) -> None:
    """One line, on process 0, once per source and report (not once per data shard or
    per loader of the same file): what building the file skipped, by reason and place."""
    report = source.build_report
    key = (source.name, report.summary())
    if report.total and key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        say(f"data: {source.name}: skipped {report.total} bad records building it (counted in "
            f"data_skipped): {report.summary()}")


def _examples(source: Source, kind: str, tokenizer, seq_len: int, index: int):
    """(index, raw record, examples-and-truncations or reason) for one record."""
    raw = source.records[int(index)]
    rec = check_record(raw, kind)
    return index, raw, rec if isinstance(rec, str) else to_examples(rec, kind, tokenizer, seq_len)


class Loader:
    """Endless (or `num_epochs`) host-local batches; see the module docstring."""

    def __init__(self, config: DataConfig, tokenizer, *, shard_index: int | None = None,
                 shard_count: int | None = None):
        self.config = c = config.for_loader()
        self.shard_index = jax.process_index() if shard_index is None else shard_index
        self.shard_count = jax.process_count() if shard_count is None else shard_count
        if c.batch_size % self.shard_count:
            raise DataError(f"data.batch_size={c.batch_size} is not divisible by the "
                            f"{self.shard_count} processes that share it")
        self.rows = c.batch_size // self.shard_count
        self.source = open_source(c.source, split=c.split, kind=c.kind, seed=c.seed, size=c.size,
                                  data_dir=c.data_dir, cache_dir=c.cache_dir, download=c.download)
        self.kind = self.source.kind
        self.pad_id = tokenizer.pad_id

        # Equal shards on every process (up to shard_count - 1 records are left
        # out), so epochs line up across hosts.
        n = len(self.source.records) // self.shard_count * self.shard_count
        ds = grain.MapDataset.range(n)[self.shard_index::self.shard_count]
        self.epoch_len = len(ds)
        if self.epoch_len == 0:
            raise DataError(f"{c.source} ({c.split}): {len(self.source.records)} records cannot be "
                            f"shared by {self.shard_count} processes")
        if c.shuffle:
            ds = ds.shuffle(seed=c.seed)
        ds = ds.repeat(c.num_epochs)  # reseeds the shuffle every epoch
        self._stream = ds.map(lambda i: _examples(self.source, self.kind, tokenizer, c.seq_len, i))
        # Grain's map runs again on every access, and a long document is read once per
        # chunk (and a waiting chunk or a label once more): a 1 MB document took 0.75 s
        # per 8 x 128-token batch, its reading and tokenizing repeated for every chunk.
        # The records the batch in progress and the waiting chunks came from are kept.
        self._recent: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._length = None if c.num_epochs is None else self.epoch_len * c.num_epochs
        self.set_state(self._fresh_state())
        # Fail before training starts when no record is usable (bad file,
        # wrong kind, every prompt too long): build one batch and discard it.
        self._next_batch(dry_run=True)
        _announce_build_skips(self.source)

    # -- state ---------------------------------------------------------------

    def _fresh_state(self) -> dict:
        c = self.config
        return {"version": STATE_VERSION, "source": c.source, "split": c.split, "seed": c.seed,
                "shard": [self.shard_index, self.shard_count], "position": 0, "chunk": 0, "pending": [],
                "skipped": SkipReport().to_dict(), "records": 0, "truncated": 0,
                "real_slots": 0, "slots": 0}

    def get_state(self) -> dict:
        """A small JSON-able dict: where the stream is and what was counted so far."""
        return {**self._state, "skipped": self._skipped.to_dict()}

    def set_state(self, state: dict) -> None:
        expect = self._fresh_state()
        for key in ("version", "source", "split", "seed", "shard"):
            got = list(state[key]) if isinstance(state.get(key), (list, tuple)) else state.get(key)
            if got != expect[key]:
                raise DataError(f"data state was saved with {key}={state.get(key)!r}, but this loader "
                                f"has {key}={expect[key]!r}: it would not continue the same stream")
        self._state = {**expect, **state}
        self._skipped = SkipReport.from_dict(state["skipped"])

    @property
    def stats(self) -> dict:
        """Counters for the stage's metrics. Records are counted in their first epoch only."""
        s = self._state
        skipped = self.source.build_report.merged(self._skipped)  # one true count (module docstring)
        return {"records_used": s["records"], "truncated": s["truncated"],
                "skipped": dict(skipped.counts), "skipped_at": dict(skipped.places),
                "skipped_when_built": self.source.build_report.to_dict(),
                "skipped_when_read": self._skipped.to_dict(),
                "slots": s["slots"], "real_slots": s["real_slots"],
                "packing_efficiency": s["real_slots"] / max(s["slots"], 1)}

    # -- batches ---------------------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return self._next_batch()

    def _element(self, pos: int) -> tuple:
        """(index, raw record, examples-and-truncations or reason) at stream position `pos`."""
        if pos in self._recent:
            self._recent.move_to_end(pos)
            return self._recent[pos]
        element = self._recent[pos] = self._stream[pos]
        if len(self._recent) > self.config.pack_lookahead + 2:  # the current record, and each waiting chunk's
            self._recent.popitem(last=False)
        return element

    def _item(self, pos: int, chunk: int) -> tuple:
        """Example `chunk` of stream position `pos`, as a tuple over the tensor sets."""
        example = self._element(pos)[2][0][chunk]
        return example if self.kind == "preferences" else (example,)

    def _label(self, pos: int) -> int:
        """The checked label of the record at stream position `pos` (classification)."""
        index, raw, _ = self._element(pos)
        label = check_record(raw, self.kind)["label"]
        if self.config.num_classes and label >= self.config.num_classes:
            raise DataError(f"{self.source.place(index, raw)}: field 'label' is {label}, but "
                            f"num_classes={self.config.num_classes} (labels 0..{self.config.num_classes - 1}); "
                            f"set the stage's num_classes to the data's number of classes")
        return label

    def _next_batch(self, dry_run: bool = False) -> dict[str, np.ndarray]:
        """Fills one batch: first the examples left over from earlier batches, then
        new ones from the stream; an example that fits no row waits (in state
        "pending") for the next batch, up to `pack_lookahead` of them."""
        c = self.config
        s = {**self._state, "pending": [list(p) for p in self._state["pending"]]}
        skipped = SkipReport.from_dict(self._skipped.to_dict())
        prefixes = PAIR_PREFIXES if self.kind == "preferences" else ("",)
        batch = empty_batch(self.rows, c.seq_len, prefixes, self.pad_id,
                            c.max_segments if len(prefixes) == 2 else None)
        if self.kind == "classification":
            batch["labels"] = np.zeros((self.rows, c.max_segments), np.int32)
            batch["label_mask"] = np.zeros((self.rows, c.max_segments), np.float32)
        packer = FirstFit(c.seq_len, self.rows, c.max_segments, streams=len(prefixes))

        def put(item, pos: int) -> bool:
            spot = packer.place([len(ex[0]) - 1 for ex in item])
            if spot is not None:
                row, seg, offsets = spot
                for prefix, ex, off in zip(prefixes, item, offsets):
                    write(batch, prefix, ex, row, off, seg)
                if "pair_mask" in batch:
                    batch["pair_mask"][row, seg - 1] = 1.0
                if "labels" in batch:
                    batch["labels"][row, seg - 1] = self._label(pos)
                    batch["label_mask"][row, seg - 1] = 1.0
            return spot is not None

        waiting, s["pending"] = s["pending"], []
        for pos, chunk in waiting:  # oldest first: nothing waits for long
            if not put(self._item(pos, chunk), pos):
                s["pending"].append([pos, chunk])
        placed, misses = len(waiting) - len(s["pending"]), 0
        while (len(s["pending"]) < c.pack_lookahead and not packer.full()
               and (self._length is None or s["position"] < self._length)):
            pos, chunk = s["position"], s["chunk"]
            index, raw, result = self._element(pos)
            first_epoch = pos < self.epoch_len  # count each record once, not once per epoch
            if isinstance(result, str):
                if first_epoch:
                    skipped.add(result, self.source.place(index, raw))
                s["position"], misses = pos + 1, misses + 1
                if misses >= self.epoch_len:
                    raise DataError(f"{c.source} ({c.split}, shard {self.shard_index}/{self.shard_count}): "
                                    f"no usable {self.kind} record in a whole pass; "
                                    f"skipped: {skipped.summary()}")
                continue
            misses = 0
            examples, truncations = result
            if put(examples[chunk] if len(prefixes) == 2 else (examples[chunk],), pos):
                placed += 1
            else:
                s["pending"].append([pos, chunk])
            s["chunk"] = chunk + 1
            if s["chunk"] == len(examples):
                if first_epoch:
                    s["records"] += 1
                    s["truncated"] += truncations
                s["position"], s["chunk"] = pos + 1, 0
        if placed == 0:
            if dry_run:
                raise DataError(f"{c.source} ({c.split}): no usable {self.kind} record; "
                                f"skipped: {skipped.summary()}")
            raise StopIteration
        return self._finish(batch, s, skipped, dry_run)

    def _finish(self, batch, s, skipped, dry_run):
        segs = [batch[p + "segment_ids"] for p in (PAIR_PREFIXES if "pair_mask" in batch else ("",))]
        s["real_slots"] += int(sum((x > 0).sum() for x in segs))
        s["slots"] += int(sum(x.size for x in segs))
        if not dry_run:
            self._state, self._skipped = s, skipped
        return batch


class ShardedLoader:
    """A global batch built from a fixed number of data shards, whatever the process count.

    With `shards` virtual shards (each a `Loader` over records [s::shards]),
    process p of P owns shards [p*k, (p+1)*k) with k = shards / P and yields
    their rows concatenated. The global batch is then the same for 1 process or
    P processes, so runs are reproducible across hardware, and a checkpoint made
    by P processes resumes on a different number of them: the state is keyed by
    shard, not by process."""

    def __init__(self, config: DataConfig, tokenizer, shards: int):
        config.for_loader()
        processes, me = jax.process_count(), jax.process_index()
        if shards < 1 or shards % processes:
            raise DataError(f"data shards={shards} must be a positive multiple of the "
                            f"{processes} processes")
        if config.batch_size % shards:
            raise DataError(f"data.batch_size={config.batch_size} is not divisible by {shards} data shards")
        k = shards // processes
        self.shard_ids = list(range(me * k, (me + 1) * k))
        self.loaders = [Loader(config, tokenizer, shard_index=s, shard_count=shards) for s in self.shard_ids]
        self.epoch_len = sum(x.epoch_len for x in self.loaders)

    def get_state(self) -> dict:
        return {"shards": {str(s): x.get_state() for s, x in zip(self.shard_ids, self.loaders)}}

    def set_state(self, state: dict) -> None:
        """Takes a state holding (at least) this process's shards, e.g. all processes' merged."""
        shards = state.get("shards", {})
        missing = [s for s in self.shard_ids if str(s) not in shards]
        if missing:
            raise DataError(f"data state has no position for shard(s) {missing} (it has "
                            f"{sorted(shards, key=int)}): was it saved with a different data shard count?")
        for s, x in zip(self.shard_ids, self.loaders):
            x.set_state(shards[str(s)])

    def restore(self, states: list[dict]) -> None:
        """Every saving process's state, merged by shard: resumes on any process count."""
        self.set_state({"shards": {k: v for s in states for k, v in s.get("shards", {}).items()}})

    @property
    def stats(self) -> dict:
        parts = [x.stats for x in self.loaders]
        read = SkipReport()
        for p in parts:
            read = read.merged(SkipReport.from_dict(p["skipped_when_read"]))
        # every shard reads the same built source: its build report counts once
        built = SkipReport.from_dict(parts[0]["skipped_when_built"])
        skipped = built.merged(read)
        slots, real = sum(p["slots"] for p in parts), sum(p["real_slots"] for p in parts)
        return {"records_used": sum(p["records_used"] for p in parts),
                "truncated": sum(p["truncated"] for p in parts), "skipped": dict(skipped.counts),
                "skipped_at": dict(skipped.places),
                "skipped_when_built": built.to_dict(), "skipped_when_read": read.to_dict(),
                "slots": slots, "real_slots": real, "packing_efficiency": real / max(slots, 1)}

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(x) for x in self.loaders]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
