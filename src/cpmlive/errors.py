"""One exception type for every user-facing failure.

The CLI turns a ``CpmliveError`` into a single line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""


class CpmliveError(Exception):
    """A problem with the user's input (files, options, text), not with cpmlive."""
