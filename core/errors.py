"""The errors every layer raises, defined in the bottom layer so that any module can import them.

Expected mistakes (a bad flag, file or dataset) end a run with one line on stderr and exit status 2
(`core.cli.run_main`); a non-finite loss with exit status 3. Nothing here imports another module of the project.
"""
from __future__ import annotations


class UsageError(ValueError):
    """A flag value that cannot work (ratio outside (0, 1], epochs < 1, ...)."""


class DataError(ValueError):
    """A dataset, trigger or reference file that is missing or malformed."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or of another architecture."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops with the last checkpoint intact."""


EXPECTED_ERRORS = (DataError, CheckpointError, UsageError)
