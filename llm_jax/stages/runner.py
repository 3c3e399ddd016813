"""One runner for every stage: a stage is declared once (`Stage`) and `run` does
its lifecycle.

    stage = sft.stage(model_cfg, cfg.sft, init=lambda: previous_params, loader=..., after=...)
    result = runner.run(workdir, stage, mesh)     # eval.json's dict, or None if stopped early

`run`: finished already? (eval.json for the same steps: skip) -> config.json
(checked against the one the stage was started with) -> initial params ->
`prepare` (work before training, e.g. DPO's reference cache) -> `before`
(evaluation of the initial model) -> optimizer and train state (LoRA: fresh
adapters over the frozen initial weights) -> jitted step -> `loop.run_stage`
(resume, log, checkpoint, roll back spikes, `evaluate` every train.eval_every
steps) -> `after` (evaluation of the final model, LoRA merged) -> eval.json,
which marks the stage finished. Rerunning an experiment skips finished stages
and resumes an interrupted one from its checkpoints.

Every stage writes one config.json shape, which `generate.load_stage` reads
back: {"model": ModelConfig, "lora": LoRAConfig, ...the stage's own settings
(optim, train, data, ...)..., ...extra}.

A stage whose step is not a loss over batches (PPO, GRPO: rollouts, then
updates) gives `build(params, tx, schedule) -> (state, shardings, step_fn)`
instead of `loss`/`normalizer`, and, if it can train LoRA adapters (GRPO),
`build_lora(base, adapters, tx, schedule)` as well.

LoRA (`lora.rank > 0`), whichever way the step comes: the runner makes fresh
adapters (`lora.init_adapters`, seeded by train.seed) over the frozen initial
params; only they train, so the optimizer state and the checkpoints hold only
them; `evaluate` and `after` get the merged model (W + scale * A @ B), as a
later stage or an export does through `lora.load_merged`. A loss stage's loss is
wrapped by `lora.lora_loss_fn`; a build stage gets the base and the adapters
(`build_lora`) and keeps the base as an argument of its jitted functions, never
a second copy (it is also the stage's reference where it has one).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from llm_jax import checkpoint, lora, loop, model, sharding, train
from llm_jax.config import ModelConfig, OptimizerConfig, TrainConfig, to_dict
from llm_jax.data.loader import DataConfig, ShardedLoader, check_stage_data
from llm_jax.errors import ConfigError
from llm_jax.lora import LoRAConfig
from llm_jax.rundir import say, write_json

Params = Any


def finished(stage_dir: str, steps: int) -> dict | None:
    """The stage's recorded evaluation if it finished `steps` steps, else None."""
    path = os.path.join(stage_dir, "eval.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    return done if done.get("steps") == steps else None


# Settings that may change between invocations of one stage without changing what
# it computes: when to stop this invocation, how often to log, which checkpoints
# to keep, and the mesh (a checkpoint restores onto any mesh shape).
RESUMABLE = ("stop_after", "log_every", "keep_checkpoints", "async_checkpoints")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _resumable(key: str) -> bool:
    return key.split(".")[-1] in RESUMABLE or key.startswith("mesh.") or ".mesh." in key


def _started(stage_dir: str) -> bool:
    if os.path.exists(os.path.join(stage_dir, "eval.json")):
        return True
    ckpts = os.path.join(stage_dir, "checkpoints")
    return os.path.isdir(ckpts) and any(name.isdigit() for name in os.listdir(ckpts))


def check_same_config(stage_dir: str, config: dict) -> None:
    """Raises ConfigError if the stage was started (checkpoints or eval.json) with
    other settings than `config`: resuming would silently mix two configurations,
    and a finished stage would be reused as if it had the new ones."""
    path = os.path.join(stage_dir, "config.json")
    if not (os.path.exists(path) and _started(stage_dir)):
        return
    with open(path) as f:
        saved = _flat(json.load(f))
    now = _flat(json.loads(json.dumps(config, default=str)))  # as written: tuples are lists
    # Keys only one side has are a newer or older code's fields, not the user's change.
    diffs = [f"{k}: {saved[k]!r} then, {now[k]!r} now" for k in sorted(saved.keys() & now.keys())
             if saved[k] != now[k] and not _resumable(k)]
    if diffs:
        name = os.path.basename(os.path.normpath(stage_dir))
        shown = "\n  ".join(diffs[:12]) + (f"\n  ... {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise ConfigError(
            f"the {name} stage in {stage_dir} was started with other settings:\n  {shown}\n"
            "Resuming would mix two configurations (and a finished stage would be reused as it is). "
            f"Rerun with the settings it was started with ({path}), or remove {stage_dir} to train "
            "this stage again with the new ones, or use a new --workdir.")


def begin(stage_dir: str, steps: int, config: dict) -> dict | None:
    """A stage's start: checks `config` against the one it was started with
    (`check_same_config`), then returns its eval.json if it already finished
    `steps` steps, else writes config.json and returns None."""
    check_same_config(stage_dir, config)
    done = finished(stage_dir, steps)
    if done is None:
        write_json(os.path.join(stage_dir, "config.json"), config)
    return done


def record(stage_dir: str, result: dict) -> None:
    """Writes eval.json (process 0), which marks the stage finished."""
    write_json(os.path.join(stage_dir, "eval.json"), result)


def stage_params(workdir: str, stage: str, like: Any, key: str | None = None) -> Any:
    """The final params of `workdir/stage`, checked against and placed like `like`
    (an abstract tree from `abstract_params`). `key` picks a subtree of the saved
    params (e.g. "policy" from PPO's {"policy", "value"})."""
    return checkpoint.load_params(os.path.join(workdir, stage, "checkpoints"), like, key=key)


def host_params(params: Any) -> Any:
    """A full host copy (numpy) of possibly multi-host-sharded params, for evaluation
    code that runs the same small model on every process."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


# ---------------------------------------------------------------------------
# A stage, declared


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one stage trains and how it is judged; `run` does the rest.

    `settings` is the stage's own frozen config (it has `.optim` and `.train`;
    recorded in config.json). The callables run only when the stage trains (a
    finished stage is skipped without loading anything):
      init()                 the params it starts from, placed on the mesh
      loader(stage_dir)      its training batches (`data.loader.StageLoader`); the
                             stage's directory is for files it reads (DPO's reference cache)
      loss, normalizer       `train.make_train_step`'s; with `reference=True` the
                             loss also takes the initial params, frozen (a KL reference)
      prepare(dir, params)   work before training -> entries of eval.json
      before(params)         evaluation of the initial model -> entries of eval.json
      after(params)          evaluation of the final model (LoRA merged) -> entries
                             (each names its keys, e.g. "heldout_loss_before")
      evaluate(params)       every train.eval_every steps, logged as eval_<name>
      build(params, tx, schedule) -> (state, shardings, step_fn)
                             instead of loss/normalizer, for a step that is not a
                             loss over batches (PPO, GRPO)
      build_lora(base, adapters, tx, schedule) -> (state, shardings, step_fn)
                             `build` with lora.rank > 0: state.params = the fresh
                             `adapters` the runner made, trained over `base` (the
                             initial params, frozen: the step's argument, not a jit
                             constant, and its reference if it has one). A build
                             stage without it refuses LoRA (PPO: its value model and
                             head have no adapters to train).
    With `lora.rank > 0` only adapters train, over the frozen initial params.
    """

    name: str
    model: ModelConfig
    settings: Any
    init: Callable[[], Params]
    loader: Callable[[str], Any]
    loss: Callable | None = None
    normalizer: Callable | None = None
    reference: bool = False
    prepare: Callable[[str, Params], dict] | None = None
    before: Callable[[Params], dict] | None = None
    after: Callable[[Params], dict] | None = None
    evaluate: Callable[[Params], dict] | None = None
    build: Callable[[Params, Any, Any], tuple] | None = None
    build_lora: Callable[[Params, Params, Any, Any], tuple] | None = None
    optimizer_steps: int | None = None  # None: train.steps (PPO takes several updates a step)
    lora: LoRAConfig = LoRAConfig()
    extra: dict = dataclasses.field(default_factory=dict)  # more config.json entries

    @property
    def optim(self) -> OptimizerConfig:
        return self.settings.optim

    @property
    def train(self) -> TrainConfig:
        return self.settings.train


def stage_config(stage: Stage) -> dict:
    """The one config.json shape (see the module docstring)."""
    return {"model": to_dict(stage.model), "lora": to_dict(stage.lora), **to_dict(stage.settings),
            **stage.extra}


def fresh_adapters(stage: Stage) -> Params:
    """The LoRA adapters a stage starts from (B = 0: the adapted model is the base)."""
    return lora.init_adapters(stage.lora, stage.model, jax.random.PRNGKey(stage.train.seed))


def _state_and_step(stage: Stage, params: Params, tx, schedule, mesh):
    """(state, shardings, step_fn, frozen): `frozen` is what the step reads but does not
    train and what the adapters merge into (the initial params) with LoRA or a reference."""
    if stage.build is not None:
        if stage.lora.enabled:  # the build keeps the base; the runner merges into it at the end
            return (*stage.build_lora(params, fresh_adapters(stage), tx, schedule), params)
        return (*stage.build(params, tx, schedule), None)
    loss, frozen = stage.loss, (params if stage.reference else None)
    if stage.lora.enabled:
        # Adapters train; the initial weights are the frozen base (and the reference, if any).
        state, shardings = train.state_from_params(fresh_adapters(stage), tx, mesh, stage.train.seed)
        loss, frozen = lora.lora_loss_fn(loss, stage.lora, base_as_reference=stage.reference), params
    else:
        state, shardings = train.state_from_params(params, tx, mesh, stage.train.seed)
    step = train.jit_train_step(train.make_train_step(loss, stage.normalizer, tx, schedule,
                                                      stage.train.microbatches), mesh, shardings)
    step_fn = step if frozen is None else (lambda s, b: step(s, b, frozen))
    return state, shardings, step_fn, frozen


def run(workdir: str, stage: Stage, mesh, *, progress: Callable[[str], None] = say) -> dict | None:
    """Trains and evaluates `stage` in workdir/<name>: its eval.json dict, or None
    when it stopped early (train.stop_after). A finished stage is read, not rerun."""
    stage_dir = os.path.join(workdir, stage.name)
    if stage.build is None:  # a batch that does not fit the mesh stops here, not inside XLA
        check(stage.name, stage.settings, stage.model, mesh)
    elif stage.lora.enabled and stage.build_lora is None:
        raise ConfigError(f"{stage.name}: LoRA (lora.rank={stage.lora.rank}) serves stages that give a loss "
                          "or a step built for adapters (build_lora, as GRPO); this stage builds its own step "
                          "without one, so train it without LoRA")
    if stage.lora.enabled:  # targets and rank against the model, before anything is written
        stage.lora.validate(stage.model)
    done = begin(stage_dir, stage.train.steps, stage_config(stage))
    if done is not None:
        progress(f"{stage.name}: already finished ({stage_dir}/eval.json)")
        return done
    params = stage.init()
    result: dict = {"steps": stage.train.steps}
    if stage.prepare is not None:
        result.update(stage.prepare(stage_dir, params))
    if stage.before is not None:
        result.update(stage.before(params))
    tx, schedule = train.make_optimizer(stage.optim, stage.optimizer_steps or stage.train.steps)
    state, shardings, step_fn, frozen = _state_and_step(stage, params, tx, schedule, mesh)
    del params  # without LoRA or a reference, the step must not keep the initial copy alive
    loader = stage.loader(stage_dir)
    evaluate = stage.evaluate
    if stage.lora.enabled and evaluate is not None:  # on the model, not on the bare adapters
        evaluate = lambda adapters: stage.evaluate(lora.merge(frozen, adapters, stage.lora))  # noqa: E731
    state, summary = loop.run_stage(stage_dir, state, shardings, step_fn, loader, mesh, stage.train,
                                    progress=progress, evaluate=evaluate)
    if not summary["finished"]:
        progress(f"{stage.name}: stopped at step {stage.train.stop_after} of {stage.train.steps} "
                 "(train.stop_after); rerun the same command to continue")
        return None
    result["train_seconds"] = summary["seconds"]
    final = lora.merge(frozen, state.params, stage.lora) if stage.lora.enabled else state.params
    if stage.after is not None:
        result.update(stage.after(final))
    if stage.lora.enabled:
        result["lora"] = lora.summary(stage.lora, state.params, frozen)
    stats = getattr(loader, "stats", None)
    if stats:
        result["data"] = stats
    record(stage_dir, result)
    return result


# ---------------------------------------------------------------------------
# What stages share: checks before any stage trains, loaders, held-out sums


def check(name: str, settings: Any, model_cfg: ModelConfig, mesh, *, kind: str | None = None,
          data_shards: int = 0) -> None:
    """A stage's config mistakes, found before the first stage of the run trains:
    the model and its fit on the mesh, the batch against the mesh, the sequence
    against the model, the data's record
    kind, and data.seq_len/batch_size (which come from train.*: one source)."""
    model_cfg.validate()
    sharding.check_model_fits_mesh(model_cfg, mesh)
    tr: TrainConfig = settings.train
    tr.validate(f"{name}.train")
    settings.optim.validate(f"{name}.optim")
    sharding.check_batch_fits_mesh(tr.batch_size, tr.microbatches, mesh)
    if tr.seq_len > model_cfg.max_len:
        raise ConfigError(f"{name}.train.seq_len={tr.seq_len} exceeds model.max_len={model_cfg.max_len}")
    data: DataConfig | None = getattr(settings, "data", None)
    if data is None:
        return
    for field in ("seq_len", "batch_size"):
        if getattr(data, field) is not None:
            raise ConfigError(f"{name}.data.{field}={getattr(data, field)}: a stage's rows come from "
                              f"{name}.train.{field} (one setting, one place); set that instead")
    if data_shards < 0:
        raise ConfigError(f"data_shards={data_shards} must be >= 0 (0: one per process)")
    shards = data_shards or jax.process_count()
    if shards % jax.process_count() or tr.batch_size % shards:
        raise ConfigError(f"data_shards={data_shards}: {shards} data shards must be a multiple of the "
                          f"{jax.process_count()} processes and divide {name}.train.batch_size={tr.batch_size}")
    if kind is not None:
        check_stage_data(data, kind)


def stage_loader(data: DataConfig, tr: TrainConfig, tok, data_shards: int = 0, **overrides) -> ShardedLoader:
    """The stage's batches: `data` with rows of tr.seq_len tokens, tr.batch_size rows
    a step over all processes, in `data_shards` shards (0: one per process)."""
    config = dataclasses.replace(data, seq_len=tr.seq_len, batch_size=tr.batch_size, **overrides)
    return ShardedLoader(config, tok, data_shards or jax.process_count())


def fresh_params(model_cfg: ModelConfig, mesh, seed: int) -> Params:
    """A new model's params, born sharded on the mesh: the same values
    `train.create_train_state` gives for `seed` (its first key split)."""
    like = sharding.abstract_params(lambda r: model.init(model_cfg, r), mesh, jax.random.PRNGKey(0))
    init = jax.jit(lambda r: model.init(model_cfg, r), out_shardings=jax.tree.map(lambda x: x.sharding, like))
    return init(jax.random.split(jax.random.PRNGKey(seed))[0])


def model_like(model_cfg: ModelConfig, mesh) -> Params:
    """The abstract params of `model_cfg` on the mesh: what a hand-off restores onto."""
    return sharding.abstract_params(lambda r: model.init(model_cfg, r), mesh, jax.random.PRNGKey(0))


def heldout_sums(fn: Callable, params: Params, loader, batches: int, mesh, start: dict | None = None
                 ) -> np.ndarray:
    """The sums of `fn(params, batch)`'s outputs (a tuple of scalars) over at most
    `batches` batches of `loader`, restarted at `start` when given (the same batches
    every time), as float64 on the host."""
    if start is not None:
        loader.set_state(start)
    total = None
    for _, batch in zip(range(batches), loader):
        out = np.array([float(x) for x in fn(params, sharding.shard_batch(batch, mesh))])
        total = out if total is None else total + out
    return total
