"""The run's summary: DIR/report.md with a results table, curves as PNGs, notes.

    pngs = plot_curves(workdir, ["pretrain", "sft", "dpo"])  # stage dirs, inside workdir
    write_report(workdir, rows, pngs, sections={"Notes": "..."})

where a row is {"stage": "sft", "metric": "instruction accuracy", "before": 0.02,
"after": 0.86, "seconds": 95.1}. Curves come from each stage's metrics.jsonl
(see `rundir.MetricsLog`); a stage or metric that is missing is left out of the
figures, never an error, so a report can be written for a partial run.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Iterable, Mapping

from llm_jax.errors import InputError
from llm_jax.rundir import is_primary

Series = list[tuple[int, float]]

# Which metrics the RL figures show, by stage directory name: (panel title, metric
# names to try in order).
PPO_PANELS = (("mean score", ("score", "reward")), ("KL to reference", ("kl",)))
DPO_PANELS = (("reward margin", ("reward_margin",)), ("preference accuracy", ("accuracy",)))
# GRPO's reward is its verifier's, on each step's first draw of samples (before dynamic sampling chooses)
GRPO_PANELS = (("mean reward", ("reward_mean",)), ("groups with equal rewards", ("zero_variance_groups",)))

ROW_KEYS = ("stage", "metric", "before", "after", "seconds")


# --- reading -------------------------------------------------------------------------

def _parse_line(line: str) -> dict | None:
    """One metrics row, or None. A line a killed run left half-written and a resumed
    run appended to reads `{"step": 5, "lo{"step": 5, ...}`: the last complete row
    in it is recovered."""
    for start in (0, line.rfind('{"step"')):
        if start < 0:
            continue
        try:
            row = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            return row
    return None


def _as_float(v: Any) -> float | None:
    # MetricsLog writes non-finite numbers as the strings "nan", "inf", "-inf".
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf"):
        return float(v)
    return None


def read_metrics(stage_dir: str) -> dict[str, Series]:
    """{metric: [(step, value), ...] sorted by step} from `stage_dir/metrics.jsonl`.

    {} when the file does not exist (the stage has not logged yet). A step logged
    twice (redone after a resume or a loss-spike rollback) keeps its last value:
    the curve the final model followed. A truncated last line (a killed run) is
    dropped; an unreadable line elsewhere is dropped with a warning naming it.
    """
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    by_metric: dict[str, dict[int, float]] = {}
    bad = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = _parse_line(line)
        if row is None:
            if i < len(lines) - 1:  # the last piece (no newline after it) may be torn
                bad.append(i + 1)
            continue
        for key, value in row.items():
            x = _as_float(value)
            if key != "step" and x is not None:
                by_metric.setdefault(key, {})[row["step"]] = x
    if bad:
        warnings.warn(f"{path}: skipped unreadable line(s) {bad[:10]}"
                      + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    return {k: sorted(v.items()) for k, v in by_metric.items()}


# --- figures -------------------------------------------------------------------------

def _figure(n_panels: int):
    """A matplotlib Figure of 1 x n panels drawn by the Agg canvas (no pyplot, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_curves needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(4.2 * n_panels, 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: str) -> str:
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)  # a crash mid-write never leaves half a PNG
    return path


def _panel(ax, series: Series, title: str, ylabel: str) -> None:
    steps, values = zip(*series)
    ax.plot(steps, values, marker="." if len(series) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _first(metrics: Mapping[str, Series], names: Iterable[str]) -> tuple[str, Series] | None:
    for name in names:
        if metrics.get(name):
            return name, metrics[name]
    return None


def _rl_figure(metrics: Mapping[str, Series], panels, stage: str, path: str) -> str | None:
    found = [(title, _first(metrics, names)) for title, names in panels]
    found = [(title, hit) for title, hit in found if hit is not None]
    if not found:
        return None
    fig, axes = _figure(len(found))
    for ax, (title, (name, series)) in zip(axes, found):
        _panel(ax, series, f"{stage}: {title}", name)
    return _save(fig, path)


def plot_curves(workdir: str, stage_dirs: Iterable[str]) -> list[str]:
    """Writes the run's figures into `workdir` and returns their paths:

        loss.png  "loss" vs step, one panel per stage that logged it (with the
                  held-out "eval_heldout_loss" of train.eval_every on it, if logged)
        ppo.png   mean score (or reward) and KL to the reference, if a stage named "ppo" logged them
        dpo.png   reward margin and preference accuracy, if a stage named "dpo" logged them
        grpo.png  mean reward and the share of groups with equal rewards, if a stage named "grpo" logged them

    `stage_dirs` are stage directories (relative ones are taken inside `workdir`);
    the stage's name is the directory's base name. A figure with nothing to show
    is not written. Only the primary process writes. The returned paths are absolute.
    """
    if not is_primary():
        return []
    # Absolute paths out: write_report takes a relative image path inside workdir,
    # so a relative workdir joined in here would be joined twice there (and not linked).
    workdir = os.path.abspath(workdir)
    stages = []
    for d in stage_dirs:
        d = d if os.path.isabs(d) else os.path.join(workdir, d)
        stages.append((os.path.basename(os.path.normpath(d)), read_metrics(d)))
    os.makedirs(workdir, exist_ok=True)
    written = []
    with_loss = [(name, m["loss"]) for name, m in stages if m.get("loss")]
    if with_loss:
        fig, axes = _figure(len(with_loss))
        heldout = {name: m.get("eval_heldout_loss") for name, m in stages}
        for ax, (name, series) in zip(axes, with_loss):
            _panel(ax, series, name, "loss")
            if heldout.get(name):
                steps, values = zip(*heldout[name])
                ax.plot(steps, values, marker="o", label="held-out")
                ax.legend()
        written.append(_save(fig, os.path.join(workdir, "loss.png")))
    for stage_name, panels in (("ppo", PPO_PANELS), ("dpo", DPO_PANELS), ("grpo", GRPO_PANELS)):
        for name, metrics in stages:
            if name == stage_name:
                png = _rl_figure(metrics, panels, name, os.path.join(workdir, f"{stage_name}.png"))
                if png:
                    written.append(png)
                break
    return written


# --- the report ----------------------------------------------------------------------

def _cell(v: Any, digits: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v).replace("|", "\\|").replace("\n", " ")
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, digits) if isinstance(v, float) else str(v)


def results_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """The markdown table: stage | key metric | before | after | time (s)."""
    lines = ["| stage | key metric | before | after | time (s) |",
             "|---|---|---:|---:|---:|"]
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InputError(f"report row {i} must be a dict with keys {ROW_KEYS}, got {row!r}")
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise InputError(f"report row {i} ({row.get('stage', '?')}) lacks {missing}; "
                             f"rows need {ROW_KEYS} (use None for 'before' when there is none)")
        lines.append(f"| {_cell(row['stage'])} | {_cell(row['metric'])} | {_cell(row['before'])} "
                     f"| {_cell(row['after'])} | {_cell(row['seconds'], '.1f')} |")
    return "\n".join(lines)


def write_report(workdir: str, rows: Iterable[Mapping[str, Any]], curves: Iterable[str],
                 path: str = "report.md", *, sections: Mapping[str, str] | None = None,
                 title: str = "Run report") -> str:
    """Writes `workdir/path` (markdown) and returns its path: the results table of
    `rows`, then each image of `curves` (PNG paths, e.g. from `plot_curves`) linked
    relative to the report, then `sections` ({heading: markdown text}) in order.
    Only the primary process writes (atomically)."""
    path = path if os.path.isabs(path) else os.path.join(workdir, path)
    parts = [f"# {title}", "", results_table(rows), ""]
    here = os.path.dirname(os.path.abspath(path))
    missing = []
    for png in curves:
        png = png if os.path.isabs(png) else os.path.join(workdir, png)
        if not os.path.exists(png):
            missing.append(png)
            continue
        name = os.path.splitext(os.path.basename(png))[0]
        parts += [f"![{name}]({os.path.relpath(os.path.abspath(png), here)})", ""]
    if missing:
        warnings.warn(f"report {path}: not linking missing image(s) {missing}")
    for heading, text in (sections or {}).items():
        parts += [f"## {heading}", "", str(text).strip(), ""]
    if is_primary():
        os.makedirs(here, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(parts))
        os.replace(tmp, path)
    return path
