"""Errors raised while reading checkpoints for conversion."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, truncated or not in a supported format.

    The message is one line that names the file and the problem.
    """


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle asks for a global outside the reader's allow-list.

    Raised before the global is resolved, so the code it names never runs.
    """
