"""The one entry every `python -m llm_jax.*` command and experiment goes through.

    if __name__ == "__main__":
        sys.exit(cli.run(main))

A user-fixable mistake (`llm_jax.errors.LlmJaxError`) prints `error: ...` and
exits 2; a full or read-only disk prints the file and exits 2; SIGTERM and
Ctrl-C stop the run after its pending checkpoint saves (never inside one:
`signals_deferred`) and exit 128 + signal.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
from typing import Callable, Iterator

from llm_jax.errors import LlmJaxError

_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                errno.EEXIST, errno.EISDIR}


# A stop signal that arrives inside `signals_deferred()` waits for the block's end.
_deferred = {"depth": 0, "pending": None}


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGTERM and Ctrl-C (under `run`) arriving inside the block stop the run when it
    ends, not in its middle: a checkpoint save is never cut off halfway."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        if _deferred["depth"] == 0 and _deferred["pending"] is not None:
            name, _deferred["pending"] = _deferred["pending"], None
            raise KeyboardInterrupt(name)


def run(main: Callable[[], int | None]) -> int:
    """Runs `main()` and returns the process's exit status (see the module docstring)."""
    # SIGTERM (a scheduler's stop, the launcher passing one on) becomes an exception
    # like Ctrl-C's, so the stage loop's cleanup runs: pending checkpoint saves are
    # finished and closed before the process ends.
    def stop(signum, _frame):
        name = signal.Signals(signum).name
        if _deferred["depth"]:
            _deferred["pending"] = name
            return
        raise KeyboardInterrupt(name)
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    # Orbax's notices (a read-only manager for a hand-off, save intervals) are not for a
    # command's user; its failures arrive as exceptions, which are reported.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return main() or 0
    except KeyboardInterrupt as e:
        name = str(e) or "SIGINT"
        print(f"\nstopped by {name}; saved checkpoints are kept: rerun the same command to resume from "
              "the newest one", file=sys.stderr)
        return 128 + getattr(signal, name, signal.SIGINT).value
    except LlmJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # The disk, not the code: say which file and why, not a traceback.
        if e.errno not in _DISK_ERRORS:
            raise
        print(f"error: {e.strerror}: {e.filename or ''}. Fix the disk or directory, then rerun the same "
              "command: finished stages are kept and an interrupted one resumes from its last "
              "checkpoint", file=sys.stderr)
        return 2
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
