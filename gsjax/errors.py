"""The one marker for mistakes a user makes and can fix, shared by every layer.

A config key, a mesh that does not fit the devices, a record the data refuses, a recipe file that is
not there: each error class of that kind also derives from `InputError`, and its message names the
culprit. The command lines (gsjax/cli_errors.py) print such an error as one line instead of a traceback,
since the traceback would only bury the name; any other exception keeps its traceback.
"""

from __future__ import annotations

TRACEBACK_ENV = "GSJAX_TRACEBACK"  # set to 1 to see the traceback of an InputError too


class InputError(Exception):
    """Bad input the user can fix; the message says which input and why."""


class InputFileNotFound(InputError, FileNotFoundError):
    """A file or folder the user named (a dataset, a model directory, a checkpoint) is not there."""


class RecordFileError(InputError, ValueError):
    """A dataset file that is not JSON (or JSON Lines) of the expected shape; names the file and the line."""
