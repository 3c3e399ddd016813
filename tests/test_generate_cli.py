"""`python -m llm_jax.generate`: loads a stage of a run directory and samples.

Run directories are built by saving a tiny TrainState with `checkpoint.Checkpoints`
(what `loop.run_stage` does), with the config.json an experiment writes. Every
stage (and the PPO value model, and each checkpoint step) holds its own weights,
so loading the wrong stage, subtree or step changes the completions; the
expected completions are each prompt decoded alone by the float64 reference
model (tests/reference_model.py) with that stage's own weights, never by
`generate.generate`."""

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import pretrain
from llm_jax import checkpoint, generate, model, rundir, train
from llm_jax.cli import run as run_cli
from llm_jax.config import ConfigError, preset, to_dict
from llm_jax.data import formats
from llm_jax.data.tokenizer import ByteTokenizer

TESTS = pathlib.Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
import reference_model as ref  # noqa: E402

TOK = ByteTokenizer()
CFG = dataclasses.replace(preset("tiny"), vocab_size=TOK.vocab_size)
SHAPES = jax.eval_shape(lambda: model.init(CFG, jax.random.PRNGKey(0)))
# Distinct weights per stage, drawn so that the greedy token follows the context
# (at init's weights it repeats the last token, whatever was loaded).
WEIGHTS = {name: jax.tree.map(jnp.asarray, ref.random_params(SHAPES, seed))
           for name, seed in [("pretrain", 11), ("sft", 12), ("sft@3", 13), ("policy", 14), ("value", 15),
                              ("reward", 16)]}
PARAMS = WEIGHTS["sft"]
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
    save_stage(workdir, "pretrain", WEIGHTS["pretrain"])
    save_stage(workdir, "sft", WEIGHTS["sft@3"], step=3)
    save_stage(workdir, "sft", WEIGHTS["sft"], step=5)  # the latest step
    head = {"w": jnp.ones((CFG.d_model, 1))}
    save_stage(workdir, "ppo", {"policy": WEIGHTS["policy"], "value": {"model": WEIGHTS["value"], "head": head}})
    save_stage(workdir, "reward", {"model": WEIGHTS["reward"], "head": head})
    return workdir


def cli(capsys, *argv):
    """-> (exit code, JSON lines on stdout, stderr) of the CLI run as `__main__` runs it."""
    code = run_cli(lambda: generate.main(list(argv)))
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def completions(capsys, *argv):
    code, lines, err = cli(capsys, *argv)
    assert code == 0, err
    assert [x["prompt"] for x in lines] == PROMPTS
    return [x["completion"] for x in lines]


def sample_pick(seed, temperature):
    """The sampler's documented draw: step i samples the batch with key i of
    split(PRNGKey(--seed), --max-new-tokens), from softmax(logits / temperature)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), NEW)
    return lambda step, logits: [int(t) for t in np.asarray(jax.random.categorical(
        keys[step], jnp.asarray(np.asarray(logits) / temperature, jnp.float32)))]


@functools.lru_cache(maxsize=None)
def expected(weights, template, seed=None, temperature=1.0):
    """The reference's completions of PROMPTS with WEIGHTS[weights]: greedy, or
    sampled as the CLI's --seed / --temperature say."""
    ids = [formats.prompt_tokens(TOK, p) if template else [TOK.bos_id, *TOK.encode(p)] for p in PROMPTS]
    pick = ref.greedy_pick if seed is None else sample_pick(seed, temperature)
    outs = ref.decode(CFG, WEIGHTS[weights], ids, NEW, pick=pick, eos_id=TOK.eos_id)
    return [TOK.decode(o) for o in outs]


def test_weights_make_distinct_completions():
    """What the tests below rely on: each set of weights completes the prompts in
    its own way, and the template changes what the model sees."""
    templ = [expected(w, True) for w in WEIGHTS if w != "reward"]
    assert len({tuple(t) for t in templ}) == len(templ), templ
    assert expected("pretrain", False) != expected("pretrain", True)
    assert expected("sft", False) != expected("sft", True)


def test_greedy_completions_are_the_stages_own(run, capsys):
    base = ["--workdir", run, "--max-new-tokens", str(NEW)]
    # pretrain: raw by default
    assert completions(capsys, *base, "--stage", "pretrain", *PROMPTS) == expected("pretrain", False)
    # other stages: the template; sft's latest step (5)
    assert completions(capsys, *base, "--stage", "sft", *PROMPTS) == expected("sft", True)
    assert completions(capsys, *base, "--stage", "sft", "--raw", *PROMPTS) == expected("sft", False)
    assert completions(capsys, *base, "--stage", "pretrain", "--no-raw", *PROMPTS) == expected("pretrain", True)
    # ppo: {"policy": lm params, "value": {"model", "head"}} (stages/ppo.py): the policy, not the value model
    assert completions(capsys, *base, "--stage", "ppo", *PROMPTS) == expected("policy", True)


def test_step_picks_that_checkpoint(run, capsys):
    base = ["--workdir", run, "--stage", "sft", "--max-new-tokens", str(NEW)]
    assert completions(capsys, *base, "--step", "3", *PROMPTS) == expected("sft@3", True)
    assert completions(capsys, *base, "--step", "5", *PROMPTS) == expected("sft", True)


def test_sampling_flags(run, capsys):
    base = ["--workdir", run, "--stage", "pretrain", "--max-new-tokens", str(NEW), "--temperature", "1.0"]
    greedy = expected("pretrain", False)
    want3, want4 = expected("pretrain", False, seed=3), expected("pretrain", False, seed=4)
    assert len({tuple(greedy), tuple(want3), tuple(want4)}) == 3  # each flag below has something to change
    # --temperature with --seed: the reference's samples with that seed, reproducibly
    first = completions(capsys, *base, "--seed", "3", *PROMPTS)
    assert first == want3 and completions(capsys, *base, "--seed", "3", *PROMPTS) == want3
    assert completions(capsys, *base, "--seed", "4", *PROMPTS) == want4
    # --top-k 1 and a tiny --top-p leave only the most likely token: greedy, whatever the seed
    assert completions(capsys, *base, "--seed", "3", "--top-k", "1", *PROMPTS) == greedy
    assert completions(capsys, *base, "--seed", "3", "--top-p", "1e-6", *PROMPTS) == greedy
    # --temperature 0.5: sharper than 1.0, another draw from the same keys
    want_half = expected("pretrain", False, seed=3, temperature=0.5)
    assert want_half != want3
    assert completions(capsys, *base[:-1], "0.5", "--seed", "3", *PROMPTS) == want_half


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
