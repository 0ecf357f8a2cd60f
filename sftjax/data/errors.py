"""The data pipeline's user-facing error.

Every mistake in a dataset or a tokenizer directory raises `DataError` with one line that names where it is
(`file:line`, `file[key]`, or the config key) and what is wrong, so a command-line entry point can print it
without a traceback and exit non-zero.
"""

from sftjax.errors import UserError


class DataError(UserError):
    """A dataset, tokenizer or chat template that cannot be used as asked."""
