"""User-facing errors.

A `UserError` is a mistake in what the user gave us (a path, a config value, a tensor in a checkpoint), not a bug
in sftjax. Its message is one line that names the file, key or tensor and says what is wrong; command-line entry
points print it without a traceback and exit non-zero.
"""


class UserError(ValueError):
    """Bad input from the user: one clear line, no traceback at the command line."""


class CheckpointError(UserError):
    """A checkpoint directory that cannot be loaded as asked (missing file, missing/extra/misshapen tensor)."""


class ConfigError(UserError):
    """A configuration value that is unsupported or impossible."""
