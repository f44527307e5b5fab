"""User-facing errors. Each area raises its own subclass with a message that says what to do.

The command line catches `NanoseekError` and prints its message as one line (no traceback), so
anything a user can get wrong (a config, a checkpoint, a request, a data file) should raise one.
"""


class NanoseekError(Exception):
    """Base class of every error caused by user input rather than a bug."""


class ConfigError(NanoseekError, ValueError):
    """An invalid or inconsistent configuration (model, training run, CLI override)."""


class CheckpointError(NanoseekError):
    """A checkpoint directory or file that cannot be loaded as asked."""


class TokenizerError(NanoseekError):
    """A tokenizer that cannot be trained or loaded."""


class DataError(NanoseekError):
    """Input data that is missing, malformed or empty after filtering."""


class TrainingError(NanoseekError):
    """A training run that cannot start or must stop (bad settings, non-finite loss)."""


class GenerationError(NanoseekError, ValueError):
    """An invalid generation request (sampling parameters, prompt length, limits)."""
