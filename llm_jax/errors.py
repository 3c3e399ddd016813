"""The mistakes a user can fix, in one place.

Every error that reaches a user of llm_jax's commands is an `LlmJaxError`: its
message names what is wrong, where (the field, file, record or tensor) and the
fix. `llm_jax.cli.run` turns one into a line `error: ...` and exit status 2; any
other exception is a bug in llm_jax and keeps its traceback.

Each class also derives from the builtin a caller would expect (ValueError for
bad values, RuntimeError for a run that cannot go on), so code that imports the
loss functions and catches ValueError keeps working.
"""

from __future__ import annotations


class LlmJaxError(Exception):
    """Base: a mistake in the configuration, data, files or run that the user can fix."""


class ConfigError(LlmJaxError, ValueError):
    """A config value that is wrong or does not fit the rest (names the field and the fix)."""


class WorkdirError(ConfigError):
    """A workdir that cannot hold this run: not a directory, not writable, in use."""


class MeshError(LlmJaxError, ValueError):
    """A mesh that cannot work with these devices, model or batch."""


class InputError(LlmJaxError, ValueError):
    """Arrays passed to a library function with the wrong shape, dtype or value
    (e.g. a loss's mask that does not match its log-probs)."""


class DataError(LlmJaxError, ValueError):
    """A data problem the run cannot continue past; the message names the source."""


class ReferenceCacheError(DataError):
    """A DPO reference cache that is missing, incomplete, or built for other data."""


class TokenizerError(LlmJaxError, ValueError):
    """A tokenizer that cannot be loaded or does not fit the model."""


class HFError(LlmJaxError, ValueError):
    """A Hugging Face directory, config or weight that cannot be imported or exported;
    the message names the file and the setting or tensor."""


class CheckpointError(LlmJaxError, RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint written by a different configuration than this run's."""


class TrainingDiverged(LlmJaxError, RuntimeError):
    """Too many loss spikes in too short a window: the run stops with a report."""
