"""A dependency-free progress bar for training loops.

    bar = ProgressBar(total=1000, desc="sft")
    for step in range(1, 1001):
        ...
        bar.update(step, loss=loss)
    bar.close()

On a terminal it redraws one line in place (`\\r`, cut to the terminal width):

    sft  [#########.........]  412/1000  loss 1.2345  8.31 steps/s  eta 1m11s

Anywhere else (CI logs, files, pipes) it prints the same text as a plain line at
most every `interval` seconds, plus the last step on close, so a log does not get
one line per step. Only the primary process draws by default.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import IO


def format_duration(seconds: float) -> str:
    """4 -> '4s', 71 -> '1m11s', 3725 -> '1h02m05s'; '?' when unknown."""
    if not seconds >= 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _number(v) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


class ProgressBar:
    """Step/total, loss, steps/s and ETA for a loop from `initial` to `total` steps.

    The rate counts forward progress only, from the first update on (so the first
    step's compile time does not linger in the ETA); a step that goes backwards (a
    rollback) is shown but not counted as progress.
    """

    def __init__(self, total: int, desc: str = "", enabled: bool | None = None, *,
                 initial: int = 0, stream: IO[str] | None = None, interval: float | None = None,
                 width: int | None = None):
        if not isinstance(total, int) or total < 0:
            raise ValueError(f"ProgressBar total must be an int >= 0, got {total!r}")
        if enabled is None:
            from llm_jax.rundir import is_primary
            enabled = is_primary()
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        # A terminal redraws cheaply (10/s at most); a log gets a line every 30 s.
        self.interval = interval if interval is not None else (0.1 if self.tty else 30.0)
        self.width = width
        self.step, self.loss, self.extra = initial, None, {}
        self._ref_time, self._done, self._last_step = time.monotonic(), 0, initial
        self._started = False
        self._last_draw = float("-inf")
        self._drawn_step = None  # the step the last plain line showed
        self._line_len = 0  # characters of the bar now on the terminal line

    # --- numbers ------------------------------------------------------------------

    def rate(self) -> float | None:
        """Steps per second since the first update; None before two updates."""
        elapsed = time.monotonic() - self._ref_time
        if not self._started or self._done == 0 or elapsed <= 0:
            return None
        return self._done / elapsed

    def text(self, columns: int | None = None) -> str:
        """The status line; with `columns`, a bar fills the room the text leaves."""
        rate = self.rate()
        eta = (self.total - self.step) / rate if rate else None
        parts = [f"{self.step}/{self.total}"]
        if self.loss is not None:
            parts.append(f"loss {_number(self.loss)}")
        parts += [f"{k} {_number(v)}" for k, v in self.extra.items()]
        parts.append(f"{rate:.2f} steps/s" if rate else "? steps/s")
        parts.append(f"eta {format_duration(eta) if eta is not None else '?'}")
        head = f"{self.desc}  " if self.desc else ""
        tail = "  ".join(parts)
        if columns is None:
            return head + tail
        room = columns - len(head) - len(tail) - 4  # "[" "]" and two spaces
        if room >= 10:
            filled = int(room * min(max(self.step / self.total, 0.0), 1.0)) if self.total else room
            head += "[" + "#" * filled + "." * (room - filled) + "]  "
        return (head + tail)[:columns]

    # --- drawing ------------------------------------------------------------------

    def update(self, step: int, loss: float | None = None, **extra) -> None:
        """Records `step` (and optional loss/extra numbers) and redraws if due."""
        now = time.monotonic()
        if not self._started:
            # Measure the rate from here: the first step carried the compile time.
            self._started, self._ref_time, self._done = True, now, 0
        elif step > self._last_step:
            self._done += step - self._last_step
        self._last_step = self.step = step
        if loss is not None:
            self.loss = loss
        self.extra.update(extra)
        if self.enabled and (now - self._last_draw >= self.interval or step >= self.total):
            self._draw(now)

    def _columns(self) -> int:
        if self.width is not None:
            return self.width
        return max(shutil.get_terminal_size((80, 24)).columns - 1, 20)

    def _draw(self, now: float) -> None:
        self._last_draw = now
        if self.tty:
            line = self.text(self._columns())
            pad = " " * max(self._line_len - len(line), 0)  # erase a longer previous line
            self.stream.write("\r" + line + pad)
            self._line_len = len(line)
        else:
            self.stream.write(self.text() + "\n")
            self._drawn_step = self.step
        self.stream.flush()

    def clear(self) -> None:
        """Blanks the terminal line so other output can be printed cleanly."""
        if self.enabled and self.tty and self._line_len:
            self.stream.write("\r" + " " * self._line_len + "\r")
            self.stream.flush()
            self._line_len = 0

    def redraw(self) -> None:
        """Draws the terminal bar again (after `clear` and some other output); a
        plain log gets its next line when due, not an extra one."""
        if self.enabled and self.tty and self._started:
            self._draw(time.monotonic())

    def close(self) -> None:
        """Shows the final state (non-TTY: unless already shown) and ends the line."""
        if not self.enabled:
            return
        if self.tty:
            if self._started:
                self._draw(time.monotonic())
            if self._line_len:
                self.stream.write("\n")
                self._line_len = 0
        elif self._started and self._drawn_step != self.step:
            self._draw(time.monotonic())
        self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
