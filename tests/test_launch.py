"""The local launcher's stop paths: a signal to the launcher, a timeout, a dying
worker. The workers are plain Python sleepers (no JAX), so these take seconds."""

import os
import signal
import subprocess
import sys
import time

import pytest

# A worker that records the signal it got (in DIR/worker_<pid>) and then exits.
WORKER = """
import os, signal, sys, time
out = sys.argv[1]
def on(sig, _):
    open(os.path.join(out, f"worker_{os.getpid()}"), "w").write(signal.Signals(sig).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, on)
signal.signal(signal.SIGINT, on)
open(os.path.join(out, f"started_{os.getpid()}"), "w").close()
time.sleep(120)
"""


def start_launcher(tmp_path, *extra):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, "-m", "llm_jax.launch", "--processes", "2", *extra, "--",
                             sys.executable, str(script), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(pred, seconds=60):
    end = time.time() + seconds
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def files(tmp_path, prefix):
    return sorted(p for p in os.listdir(tmp_path) if p.startswith(prefix))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_reaches_every_worker(tmp_path, sig):
    # Before: the launcher died alone and both workers kept running.
    launcher = start_launcher(tmp_path)
    assert wait_for(lambda: len(files(tmp_path, "started_")) == 2), "workers did not start"
    launcher.send_signal(sig)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 128 + sig.value
    got = files(tmp_path, "worker_")
    assert len(got) == 2 and all((tmp_path / g).read_text() == sig.name for g in got)
    assert f"got {sig.name}; passed it to all 2 processes" in err
    for name in files(tmp_path, "started_"):  # every worker is gone, not orphaned
        pid = int(name.split("_")[1])
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


def test_timeout_stops_every_worker(tmp_path):
    launcher = start_launcher(tmp_path, "--timeout", "3")
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 124
    assert "timed out after 3s; stopped all 2 processes" in err
    assert len(files(tmp_path, "worker_")) == 2  # each got SIGTERM and could clean up


def test_a_dying_worker_stops_the_other(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("time.sleep(120)",
                                     "time.sleep(120 if os.environ['LLM_JAX_PROCESS_ID'] == '0' else 1); "
                                     "sys.exit(3)"))
    res = subprocess.run([sys.executable, "-m", "llm_jax.launch", "--processes", "2", "--",
                          sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 3
    assert "process 1 of 2 died (exit code 3); stopped the others" in res.stderr
    assert [(tmp_path / g).read_text() for g in files(tmp_path, "worker_")] == ["SIGTERM"]
