"""The one exception type users see.

Every problem with what the user gave us (a prompt, a path, a threshold, a checkpoint)
is raised as `EarlyExitError` with a one-line message that names the problem. The CLIs
catch exactly this type, print the message and exit non-zero; anything else is a bug and
keeps its traceback.
"""


class EarlyExitError(ValueError):
    """A user-facing error: bad input, a missing or corrupt file, a mismatched checkpoint."""
