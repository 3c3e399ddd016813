"""`python -m llm_jax.generate`: loads a stage of a run directory and samples.

Run directories are built by saving a tiny TrainState with `checkpoint.Checkpoints`
(what `loop.run_stage` does), with the config.json an experiment writes."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from experiments import pretrain
from llm_jax import checkpoint, generate, model, rundir, train
from llm_jax.config import ConfigError, preset, to_dict
from llm_jax.data import formats
from llm_jax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CFG = dataclasses.replace(preset("tiny"), vocab_size=TOK.vocab_size)
PARAMS = model.init(CFG, jax.random.PRNGKey(0))
PROMPTS = ["Katze -> cat\nHund ->", "A B C A ->"]
NEW = 8


def save_stage(workdir, stage, params, cfg=CFG, step=3):
    TOK.save(os.path.join(workdir, "tokenizer"))
    rundir.write_json(os.path.join(workdir, stage, "config.json"),
                      to_dict(dataclasses.replace(pretrain.Config(), model=cfg)))
    tx = optax.sgd(0.1)
    state = train.TrainState(step=jnp.array(step, jnp.int32), params=params, opt_state=tx.init(params),
                             rng=jax.random.PRNGKey(1))
    ckpts = checkpoint.Checkpoints(os.path.join(workdir, stage, "checkpoints"), save_every=1,
                                   async_save=False)
    ckpts.save(step, state, {})
    ckpts.wait()
    ckpts.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    save_stage(workdir, "pretrain", PARAMS)
    save_stage(workdir, "sft", PARAMS)
    head = {"w": jnp.ones((CFG.d_model, 1))}
    save_stage(workdir, "ppo", {"policy": PARAMS, "value": {"model": PARAMS, "head": head}})
    save_stage(workdir, "reward", {"model": PARAMS, "head": head})
    return workdir


def cli(capsys, *argv):
    """-> (exit code, JSON lines on stdout, stderr) of the CLI run as `__main__` runs it."""
    code = rundir.run_main(lambda: generate.main(list(argv)))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def expected(prompts, template, **kw):
    ids = [formats.prompt_tokens(TOK, p) if template else [TOK.bos_id, *TOK.encode(p)] for p in prompts]
    outs = generate.generate(CFG, PARAMS, ids, max_new_tokens=NEW, eos_id=TOK.eos_id, pad_id=TOK.pad_id, **kw)
    return [TOK.decode(o) for o in outs]


def test_greedy_completions_match_generate(run, capsys):
    base = ["--workdir", run, "--max-new-tokens", str(NEW)]
    raw, templ = expected(PROMPTS, False), expected(PROMPTS, True)
    assert raw != templ  # the template changes what the model sees
    code, lines, _ = cli(capsys, *base, "--stage", "pretrain", *PROMPTS)  # pretrain: raw by default
    assert code == 0 and [x["prompt"] for x in lines] == PROMPTS
    assert [x["completion"] for x in lines] == raw
    code, lines, _ = cli(capsys, *base, "--stage", "sft", *PROMPTS)  # other stages: the template
    assert [x["completion"] for x in lines] == templ
    assert [x["completion"] for x in cli(capsys, *base, "--stage", "sft", "--raw", *PROMPTS)[1]] == raw
    assert [x["completion"] for x in cli(capsys, *base, "--stage", "pretrain", "--no-raw", *PROMPTS)[1]] == templ
    # ppo: {"policy": lm params, "value": {"model", "head"}} (stages/ppo.py)
    assert [x["completion"] for x in cli(capsys, *base, "--stage", "ppo", *PROMPTS)[1]] == templ


def test_sampling_is_seeded(run, capsys):
    argv = ["--workdir", run, "--stage", "pretrain", "--max-new-tokens", str(NEW), "--temperature", "1.0",
            "--seed", "3", *PROMPTS]
    first = [x["completion"] for x in cli(capsys, *argv)[1]]
    assert first == [x["completion"] for x in cli(capsys, *argv)[1]]
    assert first == expected(PROMPTS, False, temperature=1.0, rng=jax.random.PRNGKey(3))


@pytest.mark.parametrize("case, message", [
    ("no workdir", "no such directory"),
    ("no stage", "--stage dpo: no "),
    ("reward model", "scalar model"),
    ("too long", "exceeds model.max_len=64"),
    ("bad step", "--step 7: "),
    ("no checkpoint", "no checkpoints at"),
    ("wrong shapes", "do not fit this model config"),
    ("bad sampling", "bad sampling settings"),
])
def test_errors_are_one_line_exit_2(run, tmp_path, capsys, case, message):
    argv = {"no workdir": ["--workdir", str(tmp_path / "nope"), "--stage", "sft", "hi"],
            "no stage": ["--workdir", run, "--stage", "dpo", "hi"],
            "reward model": ["--workdir", run, "--stage", "reward", "hi"],
            "too long": ["--workdir", run, "--stage", "sft", "--max-new-tokens", "8", "x" * 60],
            "bad step": ["--workdir", run, "--stage", "sft", "--step", "7", "hi"],
            "bad sampling": ["--workdir", run, "--stage", "sft", "--top-p", "0", "hi"]}.get(case)
    if case == "no checkpoint":
        save_stage(str(tmp_path), "sft", PARAMS)
        os.rename(tmp_path / "sft" / "checkpoints", tmp_path / "moved")
        argv = ["--workdir", str(tmp_path), "--stage", "sft", "hi"]
    if case == "wrong shapes":  # config.json says d_ff=64, the weights have d_ff=128
        save_stage(str(tmp_path), "sft", PARAMS)
        rundir.write_json(str(tmp_path / "sft" / "config.json"),
                          to_dict(dataclasses.replace(pretrain.Config(), model=dataclasses.replace(CFG, d_ff=64))))
        argv = ["--workdir", str(tmp_path), "--stage", "sft", "hi"]
    code, lines, err = cli(capsys, *argv)
    assert code == 2 and lines == []
    assert err.startswith("error: ") and message in err, err
    if case == "no stage":  # names the stages that are there
        assert "['ppo', 'pretrain', 'reward', 'sft']" in err


def test_module_entry_point_has_no_traceback(run):
    proc = subprocess.run([sys.executable, "-m", "llm_jax.generate", "--workdir", run, "--stage", "dpo", "hi"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: --stage dpo") and len(proc.stderr.strip().splitlines()) == 1


def test_model_config_from_dict_names_unknown_fields():
    d = to_dict(CFG)
    assert generate.model_config_from_dict(d, "x.json") == CFG
    with pytest.raises(ConfigError, match=r"x.json: model fields \['n_layer'\]"):
        generate.model_config_from_dict({**d, "n_layer": 3}, "x.json")
    with pytest.raises(ConfigError, match="model.norm"):
        generate.model_config_from_dict({**d, "norm": "batchnorm"}, "x.json")
