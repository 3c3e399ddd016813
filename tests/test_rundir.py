"""The run directory's guards: one run per workdir, a workdir that is a file,
disk errors as one clear line."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from llm_jax import rundir
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
    assert rundir.run_main(full_disk) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device: /runs/demo/sft/metrics.jsonl.")
    assert "rerun the same command" in err and "Traceback" not in err

    def bug():
        raise OSError(errno.ECONNRESET, "reset")  # not a disk problem: a real traceback
    with pytest.raises(OSError):
        rundir.run_main(bug)


def test_lock_on_an_unwritable_workdir(tmp_path, monkeypatch):
    # Root ignores file modes, so the read-only file system is simulated at os.open.
    workdir = str(tmp_path / "ro")
    os.makedirs(workdir)

    def read_only(path, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", path)
    monkeypatch.setattr(rundir.os, "open", read_only)
    with pytest.raises(rundir.WorkdirError, match=r"cannot write to the workdir .*Read-only file system"):
        rundir.lock_workdir(workdir)
