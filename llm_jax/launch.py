"""Multi-process runs on JAX's own multi-controller runtime.

On TPU pods and GPU clusters every worker runs the same command and
`initialize()` calls `jax.distributed.initialize()`, which finds the coordinator
itself (set LLM_JAX_DISTRIBUTED=1; the `tpu/` scripts do). On one machine,

    python -m llm_jax.launch --processes 2 --devices-per-process 2 -- \\
        python -m experiments.pretrain --workdir runs/mh

starts N CPU processes that talk over gloo on loopback, so the multi-host code
paths (per-process data shards, global arrays, Orbax multi-host saves) run and
are tested on a laptop. If one process dies, the launcher stops the others and
says which one died and how, rather than leaving them blocked in a collective.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from llm_jax import cli

ENV_COORDINATOR = "LLM_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "LLM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LLM_JAX_PROCESS_ID"
ENV_AUTO = "LLM_JAX_DISTRIBUTED"


def initialize() -> None:
    """Joins the multi-process runtime if this process was started as part of one.

    Call once, before anything touches jax devices. A no-op for a plain run."""
    import jax

    if os.environ.get(ENV_COORDINATOR):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ[ENV_COORDINATOR],
            num_processes=int(os.environ[ENV_NUM_PROCESSES]),
            process_id=int(os.environ[ENV_PROCESS_ID]),
            # A peer that dies should end this process in seconds, not hang it.
            heartbeat_timeout_seconds=20)
    elif os.environ.get(ENV_AUTO) == "1":
        jax.distributed.initialize()  # TPU pod / SLURM / GKE: the cluster says who is who


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(command: list[str], processes: int, devices_per_process: int, timeout: float | None = None,
           log_dir: str | None = None) -> int:
    """Runs `command` as `processes` local JAX processes; returns the first failure's exit code."""
    # SIGTERM / SIGINT to the launcher (a scheduler's stop, Ctrl-C) is passed on to
    # every worker, then the launcher waits for them: exiting alone would orphan
    # workers still holding the workdir and the accelerators. Caught from before the
    # first worker starts, so one that arrives while they start reaches them all.
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        port = free_port()
        procs = []
        for i in range(processes):
            env = dict(os.environ)
            env.update({ENV_COORDINATOR: f"127.0.0.1:{port}", ENV_NUM_PROCESSES: str(processes),
                        ENV_PROCESS_ID: str(i), "JAX_PLATFORMS": "cpu"})
            flags = [f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
            out = None
            if log_dir:
                os.makedirs(log_dir, exist_ok=True)
                out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
            procs.append(subprocess.Popen(command, env=env, stdout=out,
                                          stderr=subprocess.STDOUT if out else None))
        return _supervise(procs, processes, timeout, received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(procs: list, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    """Sends `sig` to the workers still running and waits; kills any left after `grace` s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(sig)
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _supervise(procs: list, processes: int, timeout: float | None, received: list[int]) -> int:
    start = time.time()
    failed = None
    while True:
        if received:
            sig = signal.Signals(received[0])
            _stop(procs, sig)
            print(f"launch: got {sig.name}; passed it to all {processes} processes and waited for them "
                  "to stop", file=sys.stderr)
            return 128 + sig.value
        codes = [p.poll() for p in procs]
        bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            failed = bad[0]
            break
        if all(c == 0 for c in codes):
            return 0
        if timeout is not None and time.time() - start > timeout:
            failed = (-1, 124)
            break
        time.sleep(0.2)

    _stop(procs)
    i, code = failed
    if i < 0:
        print(f"launch: timed out after {timeout:.0f}s; stopped all {processes} processes", file=sys.stderr)
        return code
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
    print(f"launch: process {i} of {processes} died ({how}); stopped the others", file=sys.stderr)
    return code if code > 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a command as N local JAX processes (CPU, gloo).")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before everything is stopped")
    parser.add_argument("--log-dir", default=None, help="write each process's output to LOG_DIR/process_I.log")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be >= 1")
    return launch(command, args.processes, args.devices_per_process, args.timeout, args.log_dir)


if __name__ == "__main__":
    sys.exit(cli.run(main))
