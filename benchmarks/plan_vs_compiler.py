"""The memory planner (`llm_jax.plan`) against the TPU compiler's own per-chip bytes.

    cd /work/main && nohup python -m benchmarks.plan_vs_compiler > /tmp/pvc.log 2>&1 &   # ~35 min on 2 busy cores
    python -m benchmarks.plan_vs_compiler --reuse      # planner columns only, compiled bytes from the JSON
    python -m benchmarks.plan_vs_compiler --only gpt2  # rows whose name contains "gpt2"

Every row compiles one training step (`llm_jax.aot.compile_stage`: the stage's
own jitted step, lowered from abstract inputs for a v5p slice with libtpu on
this CPU host; nothing is allocated) and reads XLA's memory analysis of one
chip: arguments (params, AdamW moments, batch; the state is donated, so its
outputs alias it), temporaries (gradients, activations, gathered weights,
logits) and total = arguments + outputs + temp - alias. Beside it: the
planner's params + optimizer (vs arguments), gradients + activations (vs temp)
and total, for the same model, mesh, batch and sequence length.

Rows: real shapes at full depth (scanned layers: the compile costs one layer,
whatever the depth), except llama3_8b, whose rows keep its real layer and cut
the depth to 4. The planner is linear in the depth by construction (per-layer
saved activations x L, plus terms that do not depend on L); the full-depth check
of the 8B (and 7B, 1B) is in benchmarks/TPU_AOT.md, whose full fine-tuning rows
carry the planner's total beside the compiler's (`python -m benchmarks.tpu_aot`). Compute bfloat16
with float32 master weights (`model.dtype=bfloat16`, `param_dtype=float32`),
AdamW, `batch_size` sequences over data x fsdp (1 per chip unless said).

Writes benchmarks/PLAN_VS_COMPILER.md and .json after every row (a run cut
short keeps what it compiled); --reuse takes the compiled bytes from the JSON
and recomputes only the planner's columns (for changing the planner).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import time

import jax

from llm_jax import aot, plan
from llm_jax.config import MeshConfig, preset

HERE = os.path.dirname(os.path.abspath(__file__))
GiB = 1024 ** 3
TOLERANCE = 0.20  # the planner's total must be within 20% of the compiler's


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    preset: str
    mesh: tuple[int, int, int]  # data, fsdp, tensor over the 4 chips of v5p:2x2x1
    remat: str
    seq_len: int
    batch_size: int
    stage: str = "pretrain"
    layers: int | None = None  # None: the preset's depth
    topology: str = "v5p:2x2x1"

    def settings(self) -> aot.AOTSettings:
        over = {"dtype": "bfloat16", "param_dtype": "float32", "remat": self.remat}
        if self.layers:
            over["num_layers"] = self.layers
        if self.seq_len > preset(self.preset).max_len:
            over["max_len"] = self.seq_len
        return aot.AOTSettings(stage=self.stage, topology=self.topology, mesh=MeshConfig(*self.mesh),
                               batch_size=self.batch_size, seq_len=self.seq_len,
                               model=preset(self.preset, **over), label=self.preset)


FSDP, DATA_FSDP, FSDP_TENSOR = (1, 4, 1), (2, 2, 1), (1, 2, 2)
ROWS = [
    Row("gpt2 fsdp none 1024", "gpt2", FSDP, "none", 1024, 4),
    Row("gpt2 fsdp dots 1024", "gpt2", FSDP, "dots", 1024, 4),
    Row("gpt2 fsdp full 1024", "gpt2", FSDP, "full", 1024, 4),
    Row("gpt2 data x fsdp full 1024", "gpt2", DATA_FSDP, "full", 1024, 4),
    Row("llama fsdp none 1024", "llama", FSDP, "none", 1024, 4),
    Row("llama fsdp dots 1024", "llama", FSDP, "dots", 1024, 4),
    Row("llama fsdp full 1024", "llama", FSDP, "full", 1024, 4),
    Row("llama fsdp full 4096", "llama", FSDP, "full", 4096, 4),
    Row("llama fsdp dots 4096", "llama", FSDP, "dots", 4096, 4),
    Row("llama data x fsdp full 4096", "llama", DATA_FSDP, "full", 4096, 4),
    Row("llama fsdp x tensor full 4096", "llama", FSDP_TENSOR, "full", 4096, 2),
    Row("llama sft fsdp full 4096", "llama", FSDP, "full", 4096, 4, stage="sft"),
    Row("llama3_8b(4 layers) fsdp full 4096", "llama3_8b", FSDP, "full", 4096, 4, layers=4),
    Row("llama3_8b(4 layers) fsdp x tensor full 4096", "llama3_8b", FSDP_TENSOR, "full", 4096, 2, layers=4),
]


def planned(row: Row) -> dict:
    s = row.settings()
    rows = s.batch_size // s.microbatches
    p = plan.plan(s.model, plan.abstract_mesh(*row.mesh), rows, s.seq_len, s.optim)
    return {"params_optimizer": p.params + p.optimizer, "gradients_activations": p.gradients + p.activations,
            "total": p.total}


def compiled(row: Row) -> dict:
    r = aot.compile_stage(row.settings())
    return {"per_chip_bytes": r["per_chip_bytes"], "compile_s": r["compile_s"], "device_kind": r["device_kind"]}


def error(planned_total: int, compiled_total: int) -> float:
    return planned_total / compiled_total - 1.0


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# The planner vs the TPU compiler: per-chip bytes of one training step",
        "",
        f"Written by `python -m benchmarks.plan_vs_compiler` on {meta['date']} ({meta['machine']}; "
        f"jax {meta['jax']}, libtpu {meta['libtpu']}). Compiled: XLA's memory analysis of one chip of "
        "v5p:2x2x1 (4 chips) for the stage's own jitted step; planned: `llm_jax.plan.plan` for the same "
        "model, mesh, batch and length. bf16 compute, f32 master weights, AdamW. "
        f"Error = planned / compiled total - 1; the target is within {TOLERANCE:.0%}.",
        "",
        "| row | mesh d,f,t | batch x T | compiled args GiB | planned params+opt GiB | compiled temp GiB "
        "| planned grads+acts GiB | compiled total GiB | planned total GiB | error | error before | compile s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        c, p = r["compiled"]["per_chip_bytes"], r["planned"]
        lines.append(
            f"| {r['name']} | {','.join(map(str, r['mesh']))} | {r['batch_size']} x {r['seq_len']} "
            f"| {c['arguments'] / GiB:.2f} | {p['params_optimizer'] / GiB:.2f} | {c['temp'] / GiB:.2f} "
            f"| {p['gradients_activations'] / GiB:.2f} | {c['total'] / GiB:.2f} | {p['total'] / GiB:.2f} "
            f"| {r['error']:+.1%}{'' if abs(r['error']) <= TOLERANCE else ' **miss**'} "
            f"| {r.get('error_before', r['error']):+.1%} | {r['compiled']['compile_s']:.0f} |")
    worst = max((abs(r["error"]) for r in results), default=0.0)
    lines += ["", f"Largest error: {worst:.1%} over {len(results)} rows. \"error before\": the estimate of "
              "the planner the row was compiled with (for the first table, commit 5ad033c's, before "
              "`plan.activation_terms`). Full-depth Llama-3-8B, Llama-2-7B and Llama-3.2-1B at 4096 tokens: "
              "the planned column of the full fine-tuning rows in TPU_AOT.md."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="compiled bytes from the JSON; recompute the planner")
    ap.add_argument("--only", default="", help="rows whose name contains this")
    ap.add_argument("--out", default=os.path.join(HERE, "PLAN_VS_COMPILER"), help="path without .md/.json")
    args = ap.parse_args(argv)
    # Before anything starts a backend (the planner's PRNGKey): the host has no TPU, and
    # libtpu must be told so before it loads (aot._quiet_libtpu's docstring).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    aot._quiet_libtpu(aot.CHIPS["v5p"], 4)
    old = {}
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = {r["name"]: r for r in json.load(f)["rows"]}
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, no TPU",
            "jax": jax.__version__, "libtpu": aot.libtpu_version()}
    results = []
    for row in ROWS:
        if args.only not in row.name:
            if row.name in old:
                results.append(old[row.name])
            continue
        if args.reuse:
            if row.name not in old:
                continue
            got = old[row.name]["compiled"]
        else:
            t0 = time.time()
            got = compiled(row)
            print(f"{row.name}: compiled in {time.time() - t0:.0f} s", flush=True)
        p = planned(row)
        # The estimate of the planner the row was compiled with, kept through --reuse
        # (shows what a change to the planner did).
        before = old[row.name].get("planned_before", old[row.name]["planned"]) if args.reuse else p
        results.append({**dataclasses.asdict(row), "compiled": got, "planned": p, "planned_before": before,
                        "error": error(p["total"], got["per_chip_bytes"]["total"]),
                        "error_before": error(before["total"], got["per_chip_bytes"]["total"])})
        print(f"  total compiled {got['per_chip_bytes']['total'] / GiB:.2f} GiB, planned "
              f"{p['total'] / GiB:.2f} GiB ({results[-1]['error']:+.1%})", flush=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"meta": meta, "rows": results}, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
