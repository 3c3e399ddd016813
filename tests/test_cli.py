"""The one CLI entry: named errors are one line, signals stop a run between saves."""

import os
import signal

from llm_jax import cli
from llm_jax.errors import ConfigError


def test_a_named_error_is_one_line_and_exit_2(capsys):
    def main():
        raise ConfigError("train.steps=-1 must be positive")
    assert cli.run(main) == 2
    assert capsys.readouterr().err == "error: train.steps=-1 must be positive\n"


def test_a_stop_signal_inside_a_save_waits_for_its_end(capsys):
    done = []

    def main():
        with cli.signals_deferred():  # as the stage loop wraps each checkpoint save
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("the save finished")
        done.append("training went on")  # never reached: the stop comes at the block's end
        return 0

    assert cli.run(main) == 128 + signal.SIGTERM.value
    assert done == ["the save finished"]
    assert "stopped by SIGTERM; saved checkpoints are kept" in capsys.readouterr().err
    # The handlers are restored afterwards: the default SIGTERM action again.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_outside_a_save_a_stop_signal_stops_at_once(capsys):
    done = []

    def main():
        os.kill(os.getpid(), signal.SIGINT)
        done.append("went on")
        return 0

    assert cli.run(main) == 128 + signal.SIGINT.value
    assert done == []
