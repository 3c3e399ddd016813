"""Run reporting: TensorBoard event files, the progress bar, metrics.jsonl, figures, report.md.

Event files are checked against independent decoders (the protobuf library built
from the Event schema; TensorBoard/tbparse when installed) and the CRC against
published check values, not only against this package's own reader.
"""

import io
import json
import os
import struct
import warnings

import jax
import numpy as np
import pytest

from llm_jax import loop, model, sharding, train
from llm_jax import report as rep
from llm_jax import tensorboard as tb
from llm_jax.config import MeshConfig, OptimizerConfig, TrainConfig, preset
from llm_jax.progress import ProgressBar, format_duration
from llm_jax.stages import pretrain

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- TensorBoard -----------------------------------------------------------------------

def test_crc32c_published_check_values():
    assert tb.crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value
    # RFC 3720 (iSCSI) appendix B.4 test vectors.
    assert tb.crc32c(bytes(32)) == 0x8A9136AA
    assert tb.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tb.crc32c(bytes(range(32))) == 0x46DD794E
    assert tb.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert tb.crc32c(b"") == 0


def test_no_crc_package_needed():
    src = open(tb.__file__).read()
    assert "import crc32c" not in src and "google_crc32c" not in src and "tensorflow" not in [
        line.split()[1] for line in src.splitlines() if line.startswith("import ")]


SCALARS = [("loss", 2.5, 1), ("loss", 1.25, 2), ("lr", 3e-4, 2), ("loss", float("nan"), 3),
           ("loss", 1e40, 4), ("big_step", -7.0, 2**40)]


def write_events(logdir):
    with tb.SummaryWriter(str(logdir)) as w:
        for tag, value, step in SCALARS:
            w.scalar(tag, value, step)
    return w.path


def f32(x):
    with np.errstate(over="ignore"):
        return float(np.float32(x))  # 1e40 -> inf, as a float32 cast does


def test_event_file_round_trip(tmp_path):
    path = write_events(tmp_path / "tb")
    name = os.path.basename(path).split(".")
    assert name[:3] == ["events", "out", "tfevents"] and name[3].isdigit()
    events = tb.read_events(path)
    assert events[0]["file_version"] == "brain.Event:2" and "scalars" not in events[0]
    got = [(tag, v, e["step"]) for e in events[1:] for tag, v in e["scalars"].items()]
    assert [(t, s) for t, _, s in got] == [(t, s) for t, _, s in SCALARS]
    np.testing.assert_array_equal([v for _, v, _ in got], [f32(v) for _, v, _ in SCALARS])
    assert tb.read_scalars(str(tmp_path / "tb"))["loss"][:2] == [(1, 2.5), (2, 1.25)]
    # A second writer in the same second gets its own file; read_scalars merges them.
    path2 = write_events(tmp_path / "tb")
    assert path2 != path and len(tb.read_scalars(str(tmp_path / "tb"))["lr"]) == 2


def test_event_file_framing_is_checked(tmp_path):
    path = write_events(tmp_path)
    raw = open(path, "rb").read()
    # The frame layout by hand: the first record's length, then its masked CRC.
    (length,) = struct.unpack("<Q", raw[:8])
    crc = tb.crc32c(raw[:8])
    assert struct.unpack("<I", raw[8:12])[0] == ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF
    assert raw[12 + length + 4:] != b""
    # A torn last record (killed writer) is dropped; a flipped byte is an error.
    open(path, "wb").write(raw[:-3])
    assert len(tb.read_events(path)) == len(SCALARS)
    bad = bytearray(raw)
    bad[12 + 3] ^= 0xFF
    open(path, "wb").write(bytes(bad))
    with pytest.raises(ValueError, match="bad data CRC"):
        tb.read_events(path)


def event_message_class():
    """tensorflow.Event / Summary / Summary.Value, declared with the protobuf library."""
    descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
    from google.protobuf import descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="event_check.proto", package="check")
    value = descriptor_pb2.DescriptorProto(name="Value")
    value.field.add(name="tag", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=F.TYPE_FLOAT, label=F.LABEL_OPTIONAL)
    summary = fdp.message_type.add(name="Summary")
    summary.nested_type.append(value)
    summary.field.add(name="value", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=".check.Summary.Value")
    event = fdp.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                    type_name=".check.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("check.Event"))


def test_event_bytes_parse_with_protobuf(tmp_path):
    Event = event_message_class()
    path = write_events(tmp_path)
    records = tb.read_records(path)
    first = Event.FromString(records[0])
    assert first.file_version == "brain.Event:2" and first.wall_time > 1.6e9
    for record, (tag, value, step) in zip(records[1:], SCALARS):
        e = Event.FromString(record)
        assert e.step == step and len(e.summary.value) == 1
        assert e.summary.value[0].tag == tag
        np.testing.assert_array_equal(e.summary.value[0].simple_value, f32(value))
    # And the other way: bytes the protobuf library wrote decode with our reader.
    e = Event(wall_time=12.5, step=-3)
    e.summary.value.add(tag="kl", simple_value=0.125)
    assert tb.decode_event(e.SerializeToString()) == {"wall_time": 12.5, "step": -3,
                                                      "scalars": {"kl": 0.125}}


def test_event_file_reads_in_tensorboard(tmp_path):
    """TensorBoard itself reads our event file (the test extra installs it; not a runtime dependency)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        EventAccumulator = None
    try:
        from tbparse import SummaryReader
    except ImportError:
        SummaryReader = None
    if EventAccumulator is None and SummaryReader is None:
        pytest.skip("neither tensorboard nor tbparse is installed")
    write_events(tmp_path)
    if EventAccumulator is not None:
        acc = EventAccumulator(str(tmp_path))
        acc.Reload()
        assert [(s.step, s.value) for s in acc.Scalars("loss")][:2] == [(1, 2.5), (2, 1.25)]
        assert acc.Scalars("lr")[0].value == pytest.approx(3e-4, rel=1e-6)
    if SummaryReader is not None:
        df = SummaryReader(str(tmp_path)).scalars
        loss = df[df.tag == "loss"]
        assert list(loss.step)[:2] == [1, 2] and list(loss.value)[:2] == [2.5, 1.25]


# --- progress bar ----------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 4.4, 71, 3725)] == ["0s", "4s", "1m11s", "1h02m05s"]
    assert format_duration(float("inf")) == "?" and format_duration(float("nan")) == "?"


def test_progress_bar_plain_lines(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("llm_jax.progress.time.monotonic", clock)
    out = io.StringIO()
    bar = ProgressBar(100, "sft", enabled=True, stream=out, interval=10.0)
    # Step 1 (with compile time) at t=0, then 2 steps/s: step 1 + 2t at time t.
    for t in range(0, 31):
        clock.t = 100.0 + t
        bar.update(1 + 2 * t, loss=5.0 - 0.1 * t, lr=1e-3)
    bar.close()
    lines = out.getvalue().splitlines()
    # Drawn at t = 0, 10, 20, 30 (interval 10 s); close adds nothing (step 61 shown).
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert lines[0].startswith("sft  1/100  loss 5  lr 0.001  ? steps/s  eta ?")
    # At t=10: step 21, 20 steps in 10 s -> 2 steps/s, (100 - 21) / 2 = 39.5 s left.
    assert lines[1] == "sft  21/100  loss 4  lr 0.001  2.00 steps/s  eta 40s"
    assert lines[3] == "sft  61/100  loss 2  lr 0.001  2.00 steps/s  eta 20s"


def test_progress_bar_close_prints_last_step_and_skips_rollback_in_rate(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("llm_jax.progress.time.monotonic", clock)
    out = io.StringIO()
    bar = ProgressBar(20, "", enabled=True, stream=out, interval=1000.0, initial=4)
    for t, step in enumerate([5, 6, 7, 5, 6, 7]):  # rolled back from 7 to 4
        clock.t = 100.0 + t
        bar.update(step, loss=1.0)
    bar.close()
    lines = out.getvalue().splitlines()
    # Forward progress 2 (5->7) + 2 (5->7 again) = 4 steps in 5 s; (20 - 7) / 0.8 = 16.25 s.
    assert lines == ["5/20  loss 1  ? steps/s  eta ?", "7/20  loss 1  0.80 steps/s  eta 16s"]


def test_progress_bar_on_a_terminal(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("llm_jax.progress.time.monotonic", clock)
    out = TTY()
    bar = ProgressBar(10, "pretrain", enabled=True, stream=out, interval=0.0, width=80)
    for step in range(1, 11):
        clock.t += 0.5
        bar.update(step, loss=1.0 / step)
        bar.clear()
        bar.redraw()
    assert "\n" not in out.getvalue()
    bar.close()
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    shown = [s for s in text.rstrip("\n").split("\r") if s.strip()]
    assert all(len(s) <= 80 for s in shown)
    assert shown[-1].startswith("pretrain  [") and "]  10/10  loss 0.1  2.00 steps/s  eta 0s" in shown[-1]
    assert shown[-1].count("#") == shown[-1].index("]") - shown[-1].index("[") - 1  # full bar


def test_disabled_progress_bar_is_silent():
    out = TTY()
    bar = ProgressBar(3, "x", enabled=False, stream=out)
    for s in (1, 2, 3):
        bar.update(s, loss=1.0)
    bar.close()
    assert out.getvalue() == ""
    with pytest.raises(ValueError, match="total"):
        ProgressBar(-1, "x", enabled=False)


# --- metrics.jsonl ---------------------------------------------------------------------

def write_metrics(stage_dir, rows, tail=""):
    os.makedirs(stage_dir, exist_ok=True)
    with open(os.path.join(stage_dir, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        f.write(tail)


def test_read_metrics_tolerates_torn_lines(tmp_path):
    stage = str(tmp_path / "sft")
    write_metrics(stage, [
        {"step": 1, "loss": 3.0, "lr": 1e-4},
        {"step": 2, "loss": "nan"},
        # killed mid-write, then the resumed run appended step 2 again:
        '{"step": 3, "lo' + json.dumps({"step": 2, "loss": 2.5, "tag": "text"}),
        {"step": 3, "loss": 2.0, "spike_loss": "inf"},
    ], tail='{"step": 4, "loss": 1.')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # recovering a merged line and a torn tail is quiet
        m = rep.read_metrics(stage)
    assert m == {"loss": [(1, 3.0), (2, 2.5), (3, 2.0)], "lr": [(1, 1e-4)],
                 "spike_loss": [(3, float("inf"))]}
    assert rep.read_metrics(str(tmp_path / "never_ran")) == {}


def test_read_metrics_warns_about_damaged_middle_lines(tmp_path):
    stage = str(tmp_path / "s")
    write_metrics(stage, [{"step": 1, "loss": 1.0}, "garbage", {"step": 2, "loss": float("nan")}])
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped unreadable line\(s\) \[2\]"):
        m = rep.read_metrics(stage)
    assert m["loss"][0] == (1, 1.0) and m["loss"][1][0] == 2 and np.isnan(m["loss"][1][1])


# --- figures and report.md -------------------------------------------------------------

def png_size(path):
    raw = open(path, "rb").read()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])  # (width, height)


def synthetic_workdir(root):
    steps = range(10, 110, 10)
    write_metrics(str(root / "pretrain"), [{"step": s, "loss": 5.0 / s} for s in steps])
    write_metrics(str(root / "sft"), [{"step": s, "loss": 2.0 - s / 100} for s in steps])
    write_metrics(str(root / "ppo"), [{"step": s, "loss": 0.1, "score": s / 100, "kl": s / 1e3}
                                      for s in steps])
    write_metrics(str(root / "dpo"), [{"step": s, "loss": 0.6, "reward_margin": s / 50,
                                       "accuracy": 0.5 + s / 250} for s in steps])
    os.makedirs(root / "rm")  # a stage that has not logged anything
    return [str(root / s) for s in ("pretrain", "sft", "rm", "ppo", "dpo", "missing")]


def test_plot_curves_writes_pngs(tmp_path):
    stages = synthetic_workdir(tmp_path)
    written = rep.plot_curves(str(tmp_path), stages)
    assert [os.path.basename(p) for p in written] == ["loss.png", "ppo.png", "dpo.png"]
    # One 4.2-inch panel at 100 dpi per stage with a loss (rm has none) or per RL metric.
    assert png_size(tmp_path / "loss.png") == (1680, 320)
    assert png_size(tmp_path / "ppo.png") == (840, 320)
    assert png_size(tmp_path / "dpo.png") == (840, 320)


def test_plot_curves_skips_what_is_missing(tmp_path):
    write_metrics(str(tmp_path / "ppo"), [{"step": 1, "kl": 0.1}])  # no score, no loss
    written = rep.plot_curves(str(tmp_path), ["ppo", "dpo", "sft"])  # relative to workdir
    assert written == [str(tmp_path / "ppo.png")] and png_size(written[0]) == (420, 320)
    assert rep.plot_curves(str(tmp_path / "empty"), []) == []


ROWS = [{"stage": "pretrain", "metric": "val loss", "before": None, "after": 1.23456, "seconds": 301.27},
        {"stage": "sft", "metric": "instruction accuracy", "before": 0.02, "after": 0.86,
         "seconds": 95.1},
        {"stage": "dpo", "metric": "pref | acc", "before": 0.5, "after": float("nan"), "seconds": 7}]


def test_write_report(tmp_path):
    stages = synthetic_workdir(tmp_path)
    pngs = rep.plot_curves(str(tmp_path), stages)
    with pytest.warns(UserWarning, match="not linking missing image.*gone.png"):
        path = rep.write_report(str(tmp_path), ROWS, pngs + [str(tmp_path / "gone.png")],
                                sections={"Notes": "SFT fixed the format.\n",
                                          "Samples": "`Blume` -> flower"})
    assert path == str(tmp_path / "report.md")
    lines = open(path).read().splitlines()
    table = lines[lines.index("| stage | key metric | before | after | time (s) |"):][:5]
    assert table[2:] == ["| pretrain | val loss | – | 1.235 | 301.3 |",
                         "| sft | instruction accuracy | 0.02 | 0.86 | 95.1 |",
                         "| dpo | pref \\| acc | 0.5 | nan | 7 |"]
    text = "\n".join(lines)
    for name in ("loss", "ppo", "dpo"):
        assert f"![{name}]({name}.png)" in text
    assert "gone" not in text
    assert text.index("## Notes\n\nSFT fixed the format.") < text.index("## Samples\n\n`Blume` -> flower")
    assert text.index("| sft") < text.index("![loss]") < text.index("## Notes")
    # A report in a subfolder links the images relative to itself.
    sub = rep.write_report(str(tmp_path), ROWS[:1], pngs[:1], path="docs/r.md")
    assert "![loss](../loss.png)" in open(sub).read()


def test_report_rows_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"row 1 \(sft\) lacks \['seconds'\]"):
        rep.write_report(str(tmp_path), [ROWS[0], {"stage": "sft", "metric": "m", "before": 0,
                                                   "after": 1}], [])
    assert not os.path.exists(tmp_path / "report.md")


# --- run_stage integration -------------------------------------------------------------

def test_run_stage_writes_tensorboard_and_bar(tmp_path, capsys):
    cfg = preset("tiny")
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    tx, sched = train.make_optimizer(OptimizerConfig(lr=3e-3, warmup_steps=1), 3)

    def fresh_state():  # the jitted step donates its input state
        return train.create_train_state(lambda r: model.init(cfg, r), tx, mesh, seed=0)

    state, shardings = fresh_state()
    step_fn = train.jit_train_step(
        train.make_train_step(pretrain.clm_loss_fn(cfg), pretrain.weight_sum, tx, sched), mesh, shardings)

    class Loader:
        i = 0

        def __next__(self):
            self.i += 1
            tok = np.random.default_rng(self.i).integers(6, cfg.vocab_size, (4, 9)).astype(np.int32)
            return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "weights": np.ones((4, 8), np.float32)}

        def get_state(self):
            return {"i": self.i}

        def set_state(self, s):
            self.i = s["i"]

    stage = str(tmp_path / "warmup")
    lines = []
    tcfg = TrainConfig(steps=3, batch_size=4, seq_len=8, log_every=2, checkpoint_every=10)
    loop.run_stage(stage, state, shardings, step_fn, Loader(), mesh, tcfg, progress=lines.append)
    err = capsys.readouterr().err
    assert [s.split()[:2] for s in lines] == [["step", "2/3"], ["step", "3/3"]]
    assert "warmup  3/3  loss" in err and "eta 0s" in err  # the bar, plain lines (not a TTY)
    logged = [json.loads(x) for x in open(os.path.join(stage, "metrics.jsonl"))]
    scalars = tb.read_scalars(os.path.join(stage, "tensorboard"))
    assert [s for s, _ in scalars["loss"]] == [r["step"] for r in logged] == [2, 3]
    np.testing.assert_array_equal([v for _, v in scalars["loss"]], [f32(r["loss"]) for r in logged])
    assert set(scalars) == set(logged[0]) - {"step"}

    # show_progress=False: no bar, same text lines.
    lines.clear()
    state, _ = fresh_state()
    loop.run_stage(str(tmp_path / "quiet"), state, shardings, step_fn, Loader(), mesh, tcfg,
                   progress=lines.append, show_progress=False)
    assert capsys.readouterr().err == "" and len(lines) == 2
