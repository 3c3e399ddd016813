"""What every benchmark script shares: the machine it ran on, package versions,
summary statistics, the model FLOP count and the in-process round-robin timer.

Kept free of jax and torch imports so that a benchmark's worker process can use
it without loading the other framework (see benchmarks/core.py, which times
PyTorch and llm_jax each alone in its own process).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import resource
import sys
import time
from typing import Any, Callable

import numpy as np


def rusage() -> tuple[float, float, int]:
    """(user+system CPU seconds, system CPU seconds, minor page faults) of this
    process so far: CPU seconds do not count time other processes take the cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def stats(xs: list[float]) -> dict:
    """Median, min, max and the quartiles: the spread is quoted beside every median."""
    a = np.asarray(xs, float)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "q25": float(np.percentile(a, 25)), "q75": float(np.percentile(a, 75)), "n": len(a)}


def time_round_robin(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                     tokens: int | None = None) -> dict:
    """Times contenders that share one process (variants of the same JAX program):
    each fn runs once per round, round-robin, the order rotated every round so that
    no contender always runs first or last, after `warmup` untimed rounds run the
    same way. Contenders from different frameworks do not belong here: each
    framework's thread pools and allocator disturb the other's, so benchmarks/core.py
    times them in separate processes.

    Returns {name: {wall, cpu, sys, minflt: stats over the timed rounds,
    losses: every round's return value (warm-up included), and with `tokens`
    tokens_per_s_median / tokens_per_s_best}}. cpu/sys are this process's
    user+system / system seconds, minflt its minor page faults, per call."""
    raw = {k: {"wall": [], "cpu": [], "sys": [], "minflt": [], "out": []} for k in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            (c0, s0, f0), t0 = rusage(), time.perf_counter()
            out = fns[k]()
            wall = time.perf_counter() - t0
            c1, s1, f1 = rusage()
            raw[k]["out"].append(out)
            if r >= warmup:
                for key, val in (("wall", wall), ("cpu", c1 - c0), ("sys", s1 - s0), ("minflt", f1 - f0)):
                    raw[k][key].append(val)
    res = {}
    for k, x in raw.items():
        res[k] = {key: stats(x[key]) for key in ("wall", "cpu", "sys", "minflt")}
        res[k]["losses"] = x["out"]
        if tokens:
            res[k]["tokens_per_s_median"] = tokens / res[k]["wall"]["median"]
            res[k]["tokens_per_s_best"] = tokens / res[k]["wall"]["min"]
    return res


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def model_flops_per_step(cfg, batch: int, seq: int) -> dict:
    """6 * N * tokens with N = every matmul weight (q, k, v, o, up, [gate], down per
    layer, plus the LM head: the tied embedding used as a [D, V] matmul), plus
    attention 12 * L * T * D per token (QK^T and AV, forward + backward; the causal
    mask is NOT halved, as XLA and PyTorch both compute the full T x T scores)."""
    L, D, F, V = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    NH, GH = cfg.num_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    per_layer = D * NH + 2 * D * GH + NH * D + (3 if cfg.mlp == "swiglu" else 2) * D * F
    n_matmul = L * per_layer + D * V
    tokens = batch * seq
    dense = 6 * n_matmul * tokens
    attn = 12 * L * seq * D * tokens
    return {"n_matmul_params": n_matmul, "tokens": tokens, "dense_flops": dense,
            "attention_flops": attn, "total_flops": dense + attn}


def machine_info() -> dict:
    """The CPU, cores, memory and the load average when the benchmark started:
    figures from a shared machine mean little without the load beside them."""
    cpu_model, flags = platform.processor() or "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu_model = m.group(1).strip() if m else cpu_model
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        flags = m.group(1) if m else ""
        fam = re.search(r"^cpu family\s*:\s*(\d+)$", text, re.M)
        mod = re.search(r"^model\s*:\s*(\d+)$", text, re.M)
        if fam and mod:
            cpu_model += f" (family {fam.group(1)}, model {mod.group(1)})"
    except OSError:
        pass
    ram = 0
    try:
        with open("/proc/meminfo") as f:
            ram = int(re.search(r"MemTotal:\s*(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags.split()]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": cpu_model, "cores": cores, "ram_bytes": ram, "isa": isa,
            "platform": platform.platform(), "loadavg_start": os.getloadavg(),
            "page_size": os.sysconf("SC_PAGE_SIZE"), "xla_flags": os.environ.get("XLA_FLAGS", "")}


def versions() -> dict:
    """Installed versions, read from package metadata so that asking does not
    import jax or torch into a process that must not hold them."""
    v = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "optax", "numpy", "torch"):
        try:
            v[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            v[pkg] = "not installed"
    return v


# ---------------------------------------------------------------------------
# The report files: a Markdown table and, beside it, the raw figures as JSON


def json_beside(md_path: str) -> str:
    """benchmarks/GRPO_RESULTS.md -> benchmarks/GRPO_RESULTS.json."""
    return os.path.splitext(md_path)[0] + ".json"


def rerun_command(module: str, argv: list[str] | None) -> str:
    """The command line that measures again, as the report prints it at the top."""
    args = " ".join(argv if argv is not None else sys.argv[1:])
    return (f"cd {os.getcwd()} && PYTHONPATH={os.environ.get('PYTHONPATH', '')} {sys.executable} "
            f"-m {module} {args}").strip()


def save_report(md_path: str, results: dict, render: Callable[[dict], str]) -> None:
    """Writes the JSON first (`--report-only` can redo the report from it), then the report."""
    with open(json_beside(md_path), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(md_path, "w") as f:
        f.write(render(results))
    print(f"wrote {md_path} and {json_beside(md_path)} ({results['runtime_s']:.0f} s)", flush=True)


def rerender(json_file: str, md_path: str, render: Callable[[dict], str]) -> None:
    """`--report-only`: the report again from saved figures, measuring nothing."""
    with open(json_file) as f:
        results = json.load(f)
    with open(md_path, "w") as f:
        f.write(render(results))
    print(f"wrote {md_path} from {json_file}", flush=True)
