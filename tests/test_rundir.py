"""The run directory's guards: one run per workdir, a workdir that is a file,
disk errors as one clear line."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from llm_jax import cli, rundir
from llm_jax.config import TrainConfig

HOLDER = """
import sys, time
from llm_jax import rundir
rundir.lock_workdir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_one_workdir_is_refused_until_the_first_dies(tmp_path):
    # Before: no lock; a second run's cleanup deleted the first's in-flight save
    # and both appended to metrics.jsonl.
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    first = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.WorkdirError, match=rf"in use by another run \(pid {first.pid} on "):
            rundir.lock_workdir(workdir)
    finally:
        first.send_signal(signal.SIGKILL)  # a killed run must not keep the workdir locked
        first.wait()
    rundir.lock_workdir(workdir)
    assert f"pid {os.getpid()} " in open(os.path.join(workdir, ".lock")).read()
    rundir.lock_workdir(workdir)  # the same process again (a later stage): fine


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(rundir.WorkdirError, match="exists and is not a directory"):
        rundir.parse_args("t", TrainConfig(), ["--workdir", str(path)])


def test_disk_errors_are_one_line(capsys):
    def full_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/demo/sft/metrics.jsonl")
    assert cli.run(full_disk) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device: /runs/demo/sft/metrics.jsonl.")
    assert "rerun the same command" in err and "Traceback" not in err

    def bug():
        raise OSError(errno.ECONNRESET, "reset")  # not a disk problem: a real traceback
    with pytest.raises(OSError):
        cli.run(bug)


def test_lock_on_an_unwritable_workdir(tmp_path, monkeypatch):
    # Root ignores file modes, so the read-only file system is simulated at os.open.
    workdir = str(tmp_path / "ro")
    os.makedirs(workdir)

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(rundir.os, "open", read_only)
    with pytest.raises(rundir.WorkdirError, match=r"cannot write to the workdir .*Read-only file system"):
        rundir.lock_workdir(workdir)


def test_sigterm_to_a_run_finishes_its_saves_and_says_how_to_resume(tmp_path):
    # Before: SIGTERM ended the process at once (no cleanup: an async save could be
    # cut off) and Ctrl-C printed a traceback.
    workdir = str(tmp_path / "run")
    sets = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_ff=64",
            "model.max_len=64", "train.steps=100000", "train.batch_size=8", "train.seq_len=64",
            "train.log_every=1000", "train.checkpoint_every=10", "data.size=200", "eval_batches=1"]
    cmd = [sys.executable, "-m", "experiments.pretrain", "--workdir", workdir]
    cmd += [x for s in sets for x in ("--set", s)]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
    ckpts = os.path.join(workdir, "pretrain", "checkpoints")
    end = time.time() + 300
    while time.time() < end and not (os.path.isdir(ckpts) and
                                     sum(d.isdigit() for d in os.listdir(ckpts)) >= 2):
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM.value, err[-2000:]
    assert "stopped by SIGTERM; saved checkpoints are kept: rerun the same command" in err
    assert "Traceback" not in err
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert steps and all(s % 10 == 0 for s in steps)
    assert not [d for d in os.listdir(ckpts) if "tmp" in d]  # no save left half-written
