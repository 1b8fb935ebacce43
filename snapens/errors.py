"""The exception types that entry points turn into a one-line message instead of a traceback."""

import sys


class SnapensError(Exception):
    """A problem with the user's input (config, files, data) that the message itself explains how to fix."""


class Interrupted(Exception):
    """A stop signal arrived during training; the checkpoint is written and the same command resumes. `signal`:
    the signal's name (SIGTERM, ...), or None when another rank was stopped."""

    def __init__(self, message: str, signal: str | None = None):
        super().__init__(message)
        self.signal = signal


def exit_with(error: Exception) -> None:
    """One line on stderr, exit status 2: the message names the key or file and the fix (an OmegaConf error's key
    is added)."""
    key = getattr(error, "full_key", None)
    print(f"snapens: error: {str(error).splitlines()[0]}" + (f" ({key})" if key else ""), file=sys.stderr)
    sys.exit(2)
