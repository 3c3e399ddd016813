"""Run reporting: metrics.jsonl, figures, report.md. (What the stage loop sends to
TensorBoard and the progress bar is tested with the loop, in test_loop.py.)"""

import json
import os
import struct
import warnings

import numpy as np
import pytest

from llm_jax import report as rep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    write_metrics(str(root / "grpo"), [{"step": s, "loss": 0.0, "reward_mean": s / 200,
                                        "zero_variance_groups": 0.5} for s in steps])
    os.makedirs(root / "rm")  # a stage that has not logged anything
    return [str(root / s) for s in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo", "missing")]


def test_plot_curves_writes_pngs(tmp_path):
    stages = synthetic_workdir(tmp_path)
    written = rep.plot_curves(str(tmp_path), stages)
    assert [os.path.basename(p) for p in written] == ["loss.png", "ppo.png", "dpo.png", "grpo.png"]
    # One 4.2-inch panel at 100 dpi per stage with a loss (rm has none) or per RL metric.
    assert png_size(tmp_path / "loss.png") == (2100, 320)
    assert png_size(tmp_path / "ppo.png") == (840, 320)
    assert png_size(tmp_path / "dpo.png") == (840, 320)
    assert png_size(tmp_path / "grpo.png") == (840, 320)


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
