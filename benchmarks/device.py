"""Train-step and KV-cache sampler throughput of llm_jax on one accelerator (GPU/TPU).

The command for a session with a GPU, from the repo root (at most ~7.5 minutes
on an H100/H200: the script gives itself BUDGET_S = 440 s, start-up included, and
skips with a note in the table whatever its estimate says would run past that):

    pip install -e ".[cuda]" && python -m benchmarks.device

(where jax with CUDA is already installed, `python -m benchmarks.device` alone:
it imports nothing beyond jax, optax, orbax and llm_jax). Other forms:

    python -m benchmarks.device --tiny --out /tmp/dev.md   # dry run, tiny models, any machine (1-2 min on 2 CPU cores)
    python -m benchmarks.device --plan                     # the configurations and estimated seconds; runs nothing
    python -m benchmarks.device --models gpt2,llama        # a subset of gpt2, gpt2_medium, llama

Writes benchmarks/DEVICE_RESULTS.md and DEVICE_RESULTS.json beside it (the raw
figures), or `--out PATH.md` and PATH.json; both are rewritten after every
configuration, so a run stopped half-way keeps what it measured. On a machine
where jax sees only the CPU it exits 2 unless `--tiny`.

Measured, for GPT-2 124M (`preset("gpt2")`, batch 16 x 1024), GPT-2 medium 355M
(`gpt2_medium`, 8 x 1024) and Llama-3.2-1B (`llama`, 2 x 2048):

1. the real pretraining step (`train.make_train_step(pretrain.clm_loss_fn(cfg),
   ...)` jitted by `train.jit_train_step` on a 1-device mesh: AdamW, clipping,
   float32 master weights, bfloat16 compute) for attention "xla" vs "cudnn" and
   remat "none" vs "dots": tokens/s (median and min-max over rounds), MFU
   against the device's published dense bf16 peak (PUBLISHED_PEAKS) and against
   a bf16 matmul peak measured in the same run, XLA's temp memory, compile time,
   and whether cuDNN's fused attention is really in the compiled HLO. The batch
   is unpacked random tokens (no segment_ids), the one case where `model.attention`
   can use cuDNN (a causal mask and nothing else);
2. `generate._sample` with the KV cache, greedy: 64 prompts x 128 tokens + 256
   new tokens, new tokens/s (the prefill included).

Model FLOPs per token = 6 N + 12 L T d_model (PaLM's MFU formula, as in
`benchmarks.core.model_flops_per_step`): N = the matmul weights (q, k, v, o and
the MLP of every layer, plus the LM head's D x V; not the embedding lookup,
norms, biases or learned positions), L layers, T the sequence length; the
attention term is QK^T and AV, forward and backward, over the full T x T (not
halved for the causal mask). The optimizer update and the loss are not counted.

Timing: each configuration is compiled ahead of time (lowering + compile
reported, not timed), then warmed up (WARMUP_STEPS steps; the first one's time is
reported apart), then ROUNDS rounds of n steps, n chosen so that a round lasts
about ROUND_S; each round ends with `jax.block_until_ready`. Every configuration
starts from the same initial weights (one jitted init per model), so the loss of
the first step is comparable across attention and remat choices.

Budget: configurations run model by model (one model's optimizer state on the
device at a time) in priority order; before each one its cost is estimated
(compile time from COMPILE_GUESS_S, scaled by the compile times measured so far
in the run; steps from the FLOP count at ASSUMED_MFU of the peak), and it is
skipped with a note when it would not fit in what is left of BUDGET_S after the
more important configurations still to come (each model's first configuration,
then the samplers, then xla-vs-cudnn, then remat). An out-of-memory, at compile
or run time or foreseen from the compiled program's memory analysis, is
recorded as "OOM" and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Callable

import numpy as np

from benchmarks.common import json_beside
from benchmarks.core import model_flops_per_step, stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "DEVICE_RESULTS.md")
TINY_OUT = os.path.join(tempfile.gettempdir(), "llm_jax_device_tiny.md")  # never over the real results

MODELS = ("gpt2", "gpt2_medium", "llama")
ATTENTIONS = ("xla", "cudnn")
REMATS = ("none", "dots")

# batch x seq of the train step. Sized for an 80 GB GPU in the worst case (xla
# attention, no remat), which keeps every layer's [heads, T, T] softmax (bf16 and
# float32) for the backward pass: ~1.8 / 3.8 / 9 MB per token for the three
# models, so ~30 / 32 / 37 GB of activations beside 2 / 6 / 20 GB of float32
# params + Adam state. cuDNN and remat need far less; the batch stays the same
# so that their rows compare with the xla row.
TRAIN_SHAPES = {"gpt2": (16, 1024), "gpt2_medium": (8, 1024), "llama": (2, 2048)}
SAMPLER_SHAPE = (64, 128, 256)  # prompts, prompt tokens, new tokens
TINY_TRAIN_SHAPE = (2, 32)
TINY_SAMPLER_SHAPE = (4, 8, 8)
TINY_DIMS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff", "max_len")

# Dense (no sparsity) bf16 peak per device, TFLOP/s, by regex on
# `jax.devices()[0].device_kind` (lowercased; first match wins, so the more
# specific names come first). NVIDIA's datasheets quote bf16 "with sparsity";
# dense is half of that.
PUBLISHED_PEAKS: list[tuple[str, float, str]] = [
    (r"gh200", 989.4, "NVIDIA GH200 Grace Hopper datasheet: 1,979 TFLOPS bf16 with sparsity"),
    (r"h200 nvl", 835.5, "NVIDIA H200 datasheet, H200 NVL: 1,671 TFLOPS bf16 with sparsity"),
    (r"h200", 989.4, "NVIDIA H200 datasheet, H200 SXM: 1,979 TFLOPS bf16 with sparsity"),
    (r"h100 nvl", 835.5, "NVIDIA H100 datasheet, H100 NVL: 1,671 TFLOPS bf16 with sparsity"),
    (r"h100 pcie", 756.5, "NVIDIA H100 datasheet, H100 PCIe: 1,513 TFLOPS bf16 with sparsity"),
    (r"h100", 989.4, "NVIDIA H100 datasheet, H100 SXM: 1,979 TFLOPS bf16 with sparsity"),
    (r"a100", 312.0, "NVIDIA A100 datasheet: 312 TFLOPS bf16 dense (624 with sparsity), SXM and PCIe"),
    (r"l40s", 362.05, "NVIDIA L40S datasheet: 362.05 TFLOPS bf16 dense (733 with sparsity)"),
    (r"\bl40\b", 181.05, "NVIDIA L40 datasheet: 181.05 TFLOPS bf16 dense (362.1 with sparsity)"),
    (r"\bl4\b", 121.0, "NVIDIA L4 datasheet: 242 TFLOPS bf16 with sparsity"),
    (r"\ba10\b", 125.0, "NVIDIA A10 datasheet: 125 TFLOPS bf16 dense (250 with sparsity)"),
    (r"tpu v4", 275.0, "Google Cloud TPU v4 docs: 275 TFLOPS bf16 per chip"),
    (r"tpu v5 ?lite|tpu v5e", 197.0, "Google Cloud TPU v5e docs: 197 TFLOPS bf16 per chip"),
    (r"tpu v5", 459.0, "Google Cloud TPU v5p docs: 459 TFLOPS bf16 per chip"),
    (r"tpu v6 ?lite|tpu v6e", 918.0, "Google Cloud TPU v6e (Trillium) docs: 918 TFLOPS bf16 per chip"),
]
PLAN_DEVICE = "NVIDIA H100 80GB HBM3"  # what `--plan` estimates for when there is no accelerator

# Timing and budget (see the module docstring).
BUDGET_S = 440.0  # whole run, start-up included; 8 minutes minus a margin for imports and the report
ROUNDS, ROUND_S, WARMUP_STEPS, MAX_STEPS_PER_ROUND = 5, 0.5, 2, 100
TINY_ROUNDS, TINY_STEPS_PER_ROUND = 2, 2
ASSUMED_MFU = 0.35  # for estimates only
# Guesses of the train step's lower + compile seconds on an H100 (scan over
# layers keeps compile time nearly flat in depth); replaced during the run by
# the model's own measured compile, or scaled by how far the guesses were off.
COMPILE_GUESS_S = {"gpt2": 25.0, "gpt2_medium": 30.0, "llama": 40.0}
SAMPLER_COMPILE_GUESS_S = {"gpt2": 15.0, "gpt2_medium": 18.0, "llama": 22.0}
INIT_GUESS_S = 3.0
DECODE_STEP_GUESS_S = 0.004  # one new token of the batch: launch-bound for small models
MATMUL_PEAK_GUESS_S = 10.0

# First configuration of each model first, then the samplers (priority 1), then
# xla-vs-cudnn, then remat.
TRAIN_ORDER = (("cudnn", "none", 2), ("xla", "none", 2), ("cudnn", "dots", 3), ("xla", "dots", 3))
SAMPLER_PRIORITY = 1

FMHA_RE = re.compile(r'custom_call_target="__cudnn\$fmha(\w*)"')


# ---------------------------------------------------------------------------
# Configurations and their cost


def compute_dtype(platform: str) -> str:
    """bfloat16, except on a CPU (the --tiny dry run): XLA:CPU has no bf16 x bf16 ->
    f32 dot, which the train step's backward needs."""
    return "float32" if platform == "cpu" else "bfloat16"


def model_config(name: str, attention: str = "auto", remat: str = "none", tiny: bool = False,
                 dtype: str = "bfloat16"):
    """The preset in `dtype` compute with float32 params (master weights, as
    training keeps them); `tiny` keeps the family's architecture at preset("tiny")'s size."""
    from llm_jax.config import preset
    cfg = preset(name)
    if tiny:
        small = preset("tiny")
        cfg = dataclasses.replace(cfg, **{k: getattr(small, k) for k in TINY_DIMS})
    return dataclasses.replace(cfg, dtype=dtype, param_dtype="float32", attention_impl=attention,
                               remat=remat).validate()


def train_shape(name: str, tiny: bool) -> tuple[int, int]:
    return TINY_TRAIN_SHAPE if tiny else TRAIN_SHAPES[name]


def sampler_shape(tiny: bool) -> tuple[int, int, int]:
    return TINY_SAMPLER_SHAPE if tiny else SAMPLER_SHAPE


def param_count(cfg) -> int:
    import jax
    from llm_jax import model
    shapes = jax.eval_shape(lambda r: model.init(cfg, r), jax.random.PRNGKey(0))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


def published_peak(device_kind: str) -> tuple[float | None, str]:
    """(dense bf16 FLOP/s, source) for a device kind, or (None, why)."""
    kind = device_kind.lower()
    for pattern, tflops, source in PUBLISHED_PEAKS:
        if re.search(pattern, kind):
            return tflops * 1e12, source
    return None, f"no published bf16 peak in PUBLISHED_PEAKS for {device_kind!r}"


@dataclasses.dataclass
class Job:
    kind: str  # "train" | "sampler"
    model: str
    attention: str = "auto"
    remat: str = "none"
    priority: int = 0  # lower runs first when the budget is short
    runnable: bool = True  # False: recorded as not available, costs nothing

    @property
    def name(self) -> str:
        if self.kind == "sampler":
            return f"{self.model} sampler"
        return f"{self.model} {self.attention}/{self.remat}"


def make_jobs(models: list[str], platform: str) -> list[Job]:
    """Every configuration, model by model in the order they run. cuDNN rows off
    a GPU are kept (as "not available") but cost nothing; each model's first
    runnable train configuration gets priority 0."""
    jobs = []
    for m in models:
        first = True
        for attention, remat, prio in TRAIN_ORDER:
            runnable = attention != "cudnn" or platform == "gpu"
            if runnable and first:
                prio, first = 0, False
            jobs.append(Job("train", m, attention, remat, prio, runnable))
        jobs.append(Job("sampler", m, priority=SAMPLER_PRIORITY))
    return jobs


class Estimator:
    """Seconds a job will take: FLOPs at ASSUMED_MFU of `peak` for the steps, the
    compile guesses scaled by the compile times measured so far."""

    def __init__(self, peak: float, tiny: bool):
        self.peak, self.tiny = peak, tiny
        self.measured: dict[tuple[str, str], float] = {}  # (kind, model) -> longest compile seen
        self.ratios: list[float] = []  # measured / guessed compile

    def _guess(self, kind: str, model: str) -> float:
        return (COMPILE_GUESS_S if kind == "train" else SAMPLER_COMPILE_GUESS_S)[model]

    def record_compile(self, kind: str, model: str, seconds: float):
        key = (kind, model)
        if key not in self.measured:
            self.ratios.append(seconds / self._guess(kind, model))
        self.measured[key] = max(seconds, self.measured.get(key, 0.0))

    def compile_s(self, kind: str, model: str) -> float:
        if (kind, model) in self.measured:
            return 1.1 * self.measured[(kind, model)]
        scale = float(np.mean(self.ratios)) if self.ratios else 1.0
        return self._guess(kind, model) * scale

    def step_s(self, model: str) -> float:
        batch, seq = train_shape(model, self.tiny)
        return model_flops_per_step(model_config(model, tiny=self.tiny), batch, seq)["total_flops"] / (
            ASSUMED_MFU * self.peak)

    def sampler_call_s(self, model: str) -> float:
        b, p, new = sampler_shape(self.tiny)
        prefill = 2 * model_flops_per_step(model_config(model, tiny=self.tiny), b, p)["dense_flops"] / 6
        return new * DECODE_STEP_GUESS_S + prefill / (ASSUMED_MFU * self.peak)

    def job_s(self, job: Job) -> float:
        if not job.runnable:
            return 0.0
        if job.kind == "train":
            step = self.step_s(job.model)
            timed = TINY_ROUNDS * TINY_STEPS_PER_ROUND * step if self.tiny else ROUNDS * max(ROUND_S, step)
            return INIT_GUESS_S + self.compile_s("train", job.model) + WARMUP_STEPS * step + timed
        call = self.sampler_call_s(job.model)
        rounds = TINY_ROUNDS if self.tiny else ROUNDS
        return INIT_GUESS_S + self.compile_s("sampler", job.model) + (1 + rounds) * call


def fits_budget(i: int, jobs: list[Job], est: Estimator, elapsed: float,
                budget: float) -> tuple[bool, float, float]:
    """Whether job i fits in what is left once the more important jobs after it
    are set aside; (decision, its estimate, the seconds set aside)."""
    own = est.job_s(jobs[i])
    reserve = sum(est.job_s(j) for j in jobs[i + 1:] if j.runnable and j.priority < jobs[i].priority)
    return elapsed + own + reserve <= budget, own, reserve


# ---------------------------------------------------------------------------
# Measurements


def is_oom(e: BaseException) -> bool:
    msg = str(e)
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def failure(e: BaseException) -> dict:
    """A job's exception as a table entry: OOM, or the error's first line."""
    if is_oom(e):
        return {"status": "OOM", "note": "OOM: " + str(e).strip().splitlines()[0][:160]}
    first_line = (str(e).strip().splitlines() or [""])[0]
    return {"status": "error", "note": f"error: {type(e).__name__}: {first_line[:160]}"}


def cudnn_fmha_calls(hlo_text: str) -> dict:
    """Counts of cuDNN fused-attention custom calls in HLO text: forward and backward."""
    names = FMHA_RE.findall(hlo_text)
    bwd = sum("Backward" in n for n in names)
    return {"forward": len(names) - bwd, "backward": bwd}


def memory_info(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {k: int(getattr(m, k + "_size_in_bytes", 0)) for k in ("temp", "argument", "output", "alias")}


def device_free_bytes(device) -> int | None:
    """Bytes the allocator can still hand out on `device`; None where jax does not say (CPU)."""
    s = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not s or "bytes_limit" not in s:
        return None
    return int(s["bytes_limit"]) - int(s.get("bytes_in_use", 0))


def oom_foreseen(mem: dict, device) -> str | None:
    """A note when the compiled program's new buffers (temp + outputs not aliased to
    donated inputs) exceed the device's free memory; running it would only fail."""
    free = device_free_bytes(device)
    need = mem.get("temp", 0) + mem.get("output", 0) - mem.get("alias", 0)
    if free is None or need <= free:
        return None
    return (f"OOM: the compiled program needs {need / 2**30:.1f} GiB of new buffers, "
            f"{free / 2**30:.1f} GiB free; not run")


def matmul_peak(tiny: bool, dtype: str) -> dict:
    """`dtype` n x n @ n x n FLOP/s of jitted jnp.dot: ROUNDS rounds per size of
    enough back-to-back products to last ~ROUND_S; the peak is the best round
    of any size (so MFU against it errs low, never high)."""
    import jax
    import jax.numpy as jnp
    sizes = (128, 256) if tiny else (4096, 8192, 16384)
    round_s = 0.02 if tiny else 0.2
    out = {"sizes": {}}
    for n in sizes:
        ka, kb = jax.random.split(jax.random.PRNGKey(n))
        a = jax.random.normal(ka, (n, n), dtype)
        b = jax.random.normal(kb, (n, n), dtype)
        f = jax.jit(jnp.dot).lower(a, b).compile()
        f(a, b).block_until_ready()  # the first call pays one-time costs
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        reps = max(1, min(200, math.ceil(round_s / max(time.perf_counter() - t0, 1e-6))))
        rates = []
        for _ in range(TINY_ROUNDS if tiny else ROUNDS):
            t0 = time.perf_counter()
            for _ in range(reps):
                c = f(a, b)
            c.block_until_ready()
            rates.append(2 * n**3 * reps / (time.perf_counter() - t0))
        out["sizes"][str(n)] = {"reps": reps, "flops_per_s": rates}
        del a, b, c
    best_n = max(out["sizes"], key=lambda k: max(out["sizes"][k]["flops_per_s"]))
    out["best_n"] = int(best_n)
    out["peak_flops_per_s"] = max(out["sizes"][best_n]["flops_per_s"])
    out["median_at_best_n"] = float(np.median(out["sizes"][best_n]["flops_per_s"]))
    return out


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Unpacked rows of uniform random tokens, every weight 1: no segment_ids, so
    the model's attention sees a plain causal batch (the case cuDNN can take)."""
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "targets": rng.integers(0, vocab, (batch, seq), dtype=np.int32),
            "weights": np.ones((batch, seq), np.float32)}


class ModelBench:
    """One model's shared pieces: the mesh, optimizer, state shardings, a jitted
    init (every configuration starts from the same weights) and the batch."""

    def __init__(self, name: str, tiny: bool, dtype: str):
        import jax
        import jax.numpy as jnp
        from llm_jax import model, sharding, train
        from llm_jax.config import MeshConfig, OptimizerConfig
        self.name, self.tiny = name, tiny
        self.cfg = model_config(name, tiny=tiny, dtype=dtype)
        self.batch_size, self.seq = train_shape(name, tiny)
        self.mesh = sharding.make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
        self.tx, self.sched = train.make_optimizer(OptimizerConfig(), 1000)
        cfg, tx = self.cfg, self.tx

        def init(rng):  # what train.create_train_state builds
            p_rng, s_rng = jax.random.split(rng)
            params = model.init(cfg, p_rng)
            return train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                    opt_state=tx.init(params), rng=s_rng)

        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
        self.shardings = sharding.tree_shardings(abstract, self.mesh)
        self._init = jax.jit(init, out_shardings=self.shardings)
        self.batch = sharding.shard_batch(random_batch(self.batch_size, self.seq, cfg.vocab_size), self.mesh)
        self.n_params = param_count(cfg)

    def fresh_state(self):
        import jax
        with jax.set_mesh(self.mesh):
            return jax.block_until_ready(self._init(jax.random.PRNGKey(0)))

    def step_fn(self, cfg):
        from llm_jax import train
        from llm_jax.stages import pretrain
        return train.jit_train_step(
            train.make_train_step(pretrain.clm_loss_fn(cfg), pretrain.weight_sum, self.tx, self.sched,
                                  microbatches=1),
            self.mesh, self.shardings)


def time_train(compiled, state, batch, tiny: bool) -> dict:
    """Warm-up, then rounds of n chained steps (each round ends in block_until_ready).
    Returns the per-step seconds of each round and the warm-up figures."""
    import jax
    holder = {"state": state}

    def steps(n: int):
        s, metrics = holder["state"], None
        for _ in range(n):
            s, metrics = compiled(s, batch, None)  # frozen=None: a Compiled takes exactly its lowered args
        jax.block_until_ready((s, metrics))
        holder["state"] = s
        return metrics

    t0 = time.perf_counter()
    loss1 = float(steps(1)["loss"])
    first_s = time.perf_counter() - t0
    warm_s = []
    for _ in range(WARMUP_STEPS - 1):
        t0 = time.perf_counter()
        steps(1)
        warm_s.append(time.perf_counter() - t0)
    step_guess = warm_s[-1] if warm_s else first_s
    n = TINY_STEPS_PER_ROUND if tiny else max(1, min(MAX_STEPS_PER_ROUND, math.ceil(ROUND_S / step_guess)))
    rounds = []
    for _ in range(TINY_ROUNDS if tiny else ROUNDS):
        t0 = time.perf_counter()
        metrics = steps(n)
        rounds.append((time.perf_counter() - t0) / n)
    return {"first_step_s": first_s, "warmup_step_s": warm_s, "steps_per_round": n, "round_step_s": rounds,
            "loss_step1": loss1, "loss_last": float(metrics["loss"])}


def run_train(job: Job, mb: ModelBench, ctx: dict, res: dict) -> dict:
    """One train configuration: compile, check cuDNN, warm up, time. Fills `res`
    as it goes (what was measured before a failure stays in the table)."""
    import jax
    if not job.runnable:
        return {"status": "n/a", "note": f"not available: cuDNN attention needs a GPU, this is {ctx['platform']}"}
    cfg = dataclasses.replace(mb.cfg, attention_impl=job.attention, remat=job.remat)
    t0 = time.perf_counter()
    state = mb.fresh_state()
    res["init_s"] = time.perf_counter() - t0
    step = mb.step_fn(cfg)
    t0 = time.perf_counter()
    lowered = step.lower(state, mb.batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    res.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1)
    ctx["estimator"].record_compile("train", job.model, res["lower_s"] + res["compile_s"])
    res["memory"] = memory_info(compiled)
    res["cudnn_fmha_calls"] = cudnn_fmha_calls(compiled.as_text())
    notes = []
    if job.attention == "cudnn" and not res["cudnn_fmha_calls"]["forward"]:
        notes.append("cudnn not used: no __cudnn$fmha custom call in the compiled HLO (timed all the same)")
    if job.attention == "xla" and res["cudnn_fmha_calls"]["forward"]:
        notes.append("cuDNN fmha in the compiled HLO although xla attention was asked for")
    foreseen = oom_foreseen(res["memory"], jax.devices()[0])
    if foreseen:
        return {"status": "OOM", "note": foreseen}
    res.update(time_train(compiled, state, mb.batch, mb.tiny))
    if not (math.isfinite(res["loss_step1"]) and math.isfinite(res["loss_last"])):
        notes.append(f"non-finite loss ({res['loss_step1']}, {res['loss_last']})")
    return {**throughput(res["round_step_s"], mb, ctx), "status": "ok", "note": "; ".join(notes)}


def throughput(step_s: list[float], mb: ModelBench, ctx: dict) -> dict:
    """tokens/s and MFU of per-step times, from the model FLOP count."""
    flops = model_flops_per_step(mb.cfg, mb.batch_size, mb.seq)
    tokens = flops["tokens"]
    tps = [tokens / s for s in step_s]
    med_s = float(np.median(step_s))
    achieved = flops["total_flops"] / med_s
    return {"flops": flops, "tokens_per_step": tokens, "step_s": stats(step_s), "tokens_per_s": stats(tps),
            "model_flops_per_s": achieved,
            "mfu_measured_peak": achieved / ctx["matmul"]["peak_flops_per_s"],
            "mfu_published_peak": achieved / ctx["published_peak"] if ctx["published_peak"] else None}


def run_sampler(job: Job, mb: ModelBench, ctx: dict, res: dict) -> dict:
    """generate._sample with the KV cache, greedy, on random prompts (eos_id -1:
    every row generates all its new tokens). Params float32, as a training
    checkpoint holds them; compute in the model's dtype; attention 'auto' (the
    cached path always passes a mask, so it is XLA's)."""
    import jax
    import jax.numpy as jnp
    from llm_jax import generate, model
    b, p, new = sampler_shape(mb.tiny)
    cfg = dataclasses.replace(mb.cfg, attention_impl="auto")
    params = jax.jit(lambda r: model.init(cfg, r))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, p), dtype=np.int32))
    mask = jnp.ones((b, p), jnp.int32)
    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    lowered = generate._sample.lower(cfg, params, tokens, mask, key, max_new_tokens=new, temperature=0.0,
                                     top_k=0, top_p=1.0, eos_id=-1, use_cache=True)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    res.update(lower_s=t1 - t0, compile_s=time.perf_counter() - t1, memory=memory_info(compiled))
    ctx["estimator"].record_compile("sampler", job.model, res["lower_s"] + res["compile_s"])
    foreseen = oom_foreseen(res["memory"], jax.devices()[0])
    if foreseen:
        return {"status": "OOM", "note": foreseen}

    def call():
        out = compiled(params, tokens, mask, key, eos_id=-1)
        out.block_until_ready()
        return out

    t0 = time.perf_counter()
    out = np.asarray(call())
    res["first_call_s"] = time.perf_counter() - t0
    if out.shape != (b, new) or out.min() < 0 or out.max() >= cfg.vocab_size:
        return {"status": "error", "note": f"bad sample: shape {out.shape}, ids {out.min()}..{out.max()}"}
    times = []
    for _ in range(TINY_ROUNDS if mb.tiny else ROUNDS):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"call_s": stats(times), "round_call_s": times, "tokens_per_s": stats([b * new / t for t in times]),
            "status": "ok", "note": ""}


# ---------------------------------------------------------------------------
# The run


def run_all(args, results: dict, write: Callable[[], None], start: float):
    """Runs every job in order within the budget, filling results['train'] and
    results['sampler'] and rewriting the report after each one."""
    import jax
    est = Estimator(results["estimate_peak_flops_per_s"], args.tiny)
    ctx = {"platform": results["platform"], "matmul": results["matmul"],
           "published_peak": results["published_peak_flops_per_s"], "estimator": est}
    jobs = make_jobs(args.models, results["platform"])
    budget = BUDGET_S if not args.tiny else 10 * BUDGET_S
    mb = None
    for i, job in enumerate(jobs):
        if mb is None or mb.name != job.model:
            mb = None
            gc.collect()
            jax.clear_caches()  # the previous model's programs and state go before this one's
            mb = ModelBench(job.model, args.tiny, results["dtype"])
        ok, estimate, reserve = fits_budget(i, jobs, est, time.perf_counter() - start, budget)
        row = {"model": job.model, "kind": job.kind, "attention": job.attention, "remat": job.remat,
               "priority": job.priority, "params": mb.n_params, "estimate_s": estimate}
        if job.kind == "train":
            row.update(batch=mb.batch_size, seq=mb.seq)
        else:
            row.update(zip(("batch", "prompt_len", "new_tokens"), sampler_shape(args.tiny)))
        print(f"[{i + 1}/{len(jobs)}] {job.name} (estimate {estimate:.0f} s)", flush=True)
        t0 = time.perf_counter()
        if not ok and job.runnable:
            left = budget - (time.perf_counter() - start)
            row.update(status="skipped", note=f"skipped: estimated {estimate:.0f} s; {left:.0f} s left of the "
                                              f"{budget:.0f} s budget, {reserve:.0f} s of it kept for more "
                                              "important configurations still to come")
        else:
            try:
                row.update((run_train if job.kind == "train" else run_sampler)(job, mb, ctx, row))
            except Exception as e:  # one configuration's failure (OOM above all) must not end the run
                row.update(failure(e))
            gc.collect()
        row["actual_s"] = time.perf_counter() - t0
        print(f"    {summary_line(row)}", flush=True)
        results["train" if job.kind == "train" else "sampler"].append(row)
        write()
    results["total_s"] = time.perf_counter() - start


def summary_line(r: dict) -> str:
    if r.get("status") != "ok":
        return r.get("note") or r.get("status")
    t = r["tokens_per_s"]
    s = f"{t['median']:,.0f} tokens/s [{t['min']:,.0f}-{t['max']:,.0f}], compile {r['lower_s'] + r['compile_s']:.1f} s"
    if r["kind"] == "train":
        s += f", MFU {fmt_pct(r['mfu_published_peak'])} published / {fmt_pct(r['mfu_measured_peak'])} measured"
    return s + (f"; {r['note']}" if r.get("note") else "")


def device_info() -> dict:
    import jax
    import jaxlib
    d = jax.devices()[0]
    stats_ = d.memory_stats() if hasattr(d, "memory_stats") else None
    return {"platform": jax.default_backend(), "device_kind": d.device_kind, "device_count": len(jax.devices()),
            "memory_bytes_limit": (stats_ or {}).get("bytes_limit"), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "python": sys.version.split()[0],
            "xla_python_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ---------------------------------------------------------------------------
# Report


def status_text(r: dict) -> str:
    return {"n/a": "not available"}.get(r.get("status"), r.get("status"))


def fmt_pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_bytes(n) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def fmt_rate(s: dict) -> str:
    return f"{s['median']:,.0f} [{s['min']:,.0f}-{s['max']:,.0f}]"


def train_row(r: dict) -> str:
    shape = f"{r['batch']} x {r['seq']}"
    head = f"| {r['model']} | {fmt_params(r['params'])} | {r['attention']} | {r['remat']} | {shape} |"
    compile_s = f"{r['lower_s'] + r['compile_s']:.1f}" if "compile_s" in r else "—"
    temp = fmt_bytes(r.get("memory", {}).get("temp"))
    if r.get("status") != "ok":  # the status where the number would be: OOM, skipped, error, not available
        return head + f" {status_text(r)} | — | — | — | {temp} | {compile_s} | — | {r.get('note', '')} |"
    fmha = r["cudnn_fmha_calls"]
    note = r["note"] or (f"cuDNN fmha in HLO: {fmha['forward']} fwd, {fmha['backward']} bwd"
                         if r["attention"] == "cudnn" else "")
    return (head + f" {fmt_rate(r['tokens_per_s'])} | {r['model_flops_per_s'] / 1e12:.3g} | "
            f"{fmt_pct(r['mfu_published_peak'])} | {fmt_pct(r['mfu_measured_peak'])} | {temp} | {compile_s} | "
            f"{r['loss_step1']:.4f} | {note} |")


def sampler_row(r: dict) -> str:
    b, p, new = r.get("batch"), r.get("prompt_len"), r.get("new_tokens")
    shape = f"{b} x ({p} + {new})" if b else "—"
    head = f"| {r['model']} | {fmt_params(r['params'])} | {shape} |"
    compile_s = f"{r['lower_s'] + r['compile_s']:.1f}" if "compile_s" in r else "—"
    temp = fmt_bytes(r.get("memory", {}).get("temp"))
    if r.get("status") != "ok":
        return head + f" {status_text(r)} | — | {temp} | {compile_s} | {r.get('note', '')} |"
    ms = 1e3 * r["call_s"]["median"] / new
    return head + f" {fmt_rate(r['tokens_per_s'])} | {ms:.2f} | {temp} | {compile_s} | {r['note']} |"


def table_order(rows: list[dict]) -> list[dict]:
    key = {m: i for i, m in enumerate(MODELS)}
    return sorted(rows, key=lambda r: (key.get(r["model"], 99), ATTENTIONS.index(r["attention"])
                                       if r["attention"] in ATTENTIONS else 0, REMATS.index(r["remat"])))


def write_report(path: str, r: dict):
    d, mm = r["device"], r["matmul"]
    peak_txt = (f"{r['published_peak_flops_per_s'] / 1e12:.1f} TFLOP/s ({r['published_peak_source']})"
                if r["published_peak_flops_per_s"] else r["published_peak_source"])
    lines = [
        f"# llm_jax on {d['device_kind']}",
        "",
        f"- device: `{d['device_kind']}` ({d['platform']}, {d['device_count']} device(s); "
        f"allocator limit {fmt_bytes(d['memory_bytes_limit'])}); jax {d['jax']}, jaxlib {d['jaxlib']}, "
        f"python {d['python']}",
        f"- date: {r['date']}; command: `{r['command']}`" + (" (tiny models: the numbers only show "
                                                             "that the script works)" if r["tiny"] else ""),
        f"- total time: {r.get('total_s', 0):.0f} s (budget {r['budget_s']:.0f} s)",
        f"- published dense bf16 peak: {peak_txt}",
        f"- measured {r['dtype']} matmul peak: {mm['peak_flops_per_s'] / 1e12:.1f} TFLOP/s (best round, "
        f"n = {mm['best_n']}; median of that size {mm['median_at_best_n'] / 1e12:.1f})",
        "- model FLOPs per token = 6 N + 12 L T d_model: N = matmul weights (q, k, v, o, MLP, LM head "
        "D x V), attention over the full T x T (not halved for the causal mask); optimizer and loss not counted",
        "- train step: `train.make_train_step(pretrain.clm_loss_fn(cfg), ...)` under `train.jit_train_step` "
        f"on a 1-device mesh, AdamW, float32 params, {r['dtype']} compute, unpacked random tokens; "
        f"{timing_text(r['tiny'])}"
        f" after {WARMUP_STEPS} warm-up steps; compile time (lowering + XLA compile) excluded from the timing",
        "",
        "## Train step",
        "",
        "| model | params | attention | remat | batch x seq | tokens/s median [min-max] | model TFLOP/s | "
        "MFU vs published peak | MFU vs measured matmul peak | temp memory | compile s | loss step 1 | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[train_row(x) for x in table_order(r["train"])],
        "",
        "## KV-cache sampler (`generate._sample`, greedy, use_cache=True)",
        "",
        "new tokens/s = prompts x new tokens / seconds per call, the prefill of the prompts included; "
        f"float32 params, {r['dtype']} compute.",
        "",
        "| model | params | prompts x (prompt + new) | new tokens/s median [min-max] | ms per new token | "
        "temp memory | compile s | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[sampler_row(x) for x in table_order(r["sampler"])],
        "",
        "## Estimated against actual seconds (for the budget's guesses)",
        "",
        "| configuration | priority | estimate s | actual s | status |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {x['model']} {x['attention'] + '/' + x['remat'] if x['kind'] == 'train' else 'sampler'} | "
          f"{x['priority']} | {x['estimate_s']:.1f} | {x['actual_s']:.1f} | {x.get('status')} |"
          for x in r["train"] + r["sampler"]],
        "",
        f"Raw figures: `{os.path.basename(json_beside(path))}`.",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
    with open(json_beside(path), "w") as f:
        json.dump(r, f, indent=1, default=str)


def timing_text(tiny: bool) -> str:
    if tiny:
        return f"{TINY_ROUNDS} rounds of {TINY_STEPS_PER_ROUND} steps"
    return f"{ROUNDS} rounds of ~{ROUND_S} s"


# ---------------------------------------------------------------------------
# Plan and command line


def print_plan(models: list[str], platform: str, device_kind: str, tiny: bool):
    """The configurations in run order with their estimated seconds, and which the
    budget would skip if the estimates held."""
    peak, source = published_peak(device_kind)
    est = Estimator(peak or published_peak(PLAN_DEVICE)[0], tiny)
    jobs = make_jobs(models, platform)
    budget = BUDGET_S if not tiny else 10 * BUDGET_S
    elapsed = MATMUL_PEAK_GUESS_S
    print(f"plan for {device_kind} ({source}); budget {budget:.0f} s; matmul peak ~{elapsed:.0f} s")
    for i, job in enumerate(jobs):
        ok, s, _ = fits_budget(i, jobs, est, elapsed, budget)
        shape = ("%d x %d" % train_shape(job.model, tiny) if job.kind == "train"
                 else "%d x (%d + %d)" % sampler_shape(tiny))
        state = "n/a" if not job.runnable else ("run" if ok else "would be skipped")
        elapsed += s if ok and job.runnable else 0.0
        print(f"  {job.name:28s} {shape:16s} priority {job.priority}  ~{s:5.0f} s  {state:16s} "
              f"cumulative {elapsed:5.0f} s")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.device",
                                description="Train-step and sampler throughput of llm_jax on a GPU/TPU.")
    p.add_argument("--out", default=None, help=f"report path (.md; the .json goes beside it); default "
                                              f"{os.path.relpath(DEFAULT_OUT, ROOT)}, or {TINY_OUT} with --tiny")
    p.add_argument("--tiny", action="store_true", help="tiny models, few steps: a dry run on any machine")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    p.add_argument("--plan", action="store_true", help="print the configurations and estimated seconds, run nothing")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
    args.out = args.out or (TINY_OUT if args.tiny else DEFAULT_OUT)
    return args


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not args.tiny:
        # jax's GPU allocator takes 75% of the memory by default; a benchmark alone on
        # the device can take more (read when the backend starts, so only if it has not).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    import jax
    platform = jax.default_backend()
    if args.plan:
        kind = jax.devices()[0].device_kind if platform != "cpu" else PLAN_DEVICE
        print_plan(args.models, platform if platform != "cpu" else "gpu", kind, args.tiny)
        return 0
    if platform == "cpu" and not args.tiny:
        print("benchmarks.device: no accelerator found (jax sees only the CPU); this benchmark is for GPU/TPU "
              "(pip install -e \".[cuda]\" on a GPU machine); use --tiny for a dry run", file=sys.stderr)
        return 2
    info = device_info()
    peak, source = published_peak(info["device_kind"])
    print(f"{info['device_kind']} ({platform}), jax {info['jax']}; published peak: {source}", flush=True)
    dtype = compute_dtype(platform)
    print(f"{dtype} matmul peak ...", flush=True)
    matmul = matmul_peak(args.tiny, dtype)
    print(f"    {matmul['peak_flops_per_s'] / 1e12:.1f} TFLOP/s (n = {matmul['best_n']})", flush=True)
    results = {"device": info, "platform": platform, "tiny": args.tiny, "dtype": dtype,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "command": " ".join(["python -m benchmarks.device", *(sys.argv[1:] if argv is None else argv)]),
               "budget_s": BUDGET_S if not args.tiny else 10 * BUDGET_S, "matmul": matmul,
               "published_peak_flops_per_s": peak, "published_peak_source": source,
               # estimates use the published peak, else the measured one
               "estimate_peak_flops_per_s": peak or matmul["peak_flops_per_s"],
               "flop_formula": "6 N + 12 L T d_model per token (N = matmul weights incl. the LM head)",
               "train": [], "sampler": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    run_all(args, results, lambda: write_report(args.out, results), start)
    write_report(args.out, results)
    print(f"wrote {args.out} and {json_beside(args.out)} ({results['total_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
