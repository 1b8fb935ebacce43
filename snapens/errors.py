"""The exception types that entry points turn into a one-line message instead of a traceback."""

import sys


class SnapensError(Exception):
    """A problem with the user's input (config, files, data) that the message itself explains how to fix."""


class Interrupted(Exception):
    """A stop signal arrived during training; the checkpoint is written and the same command resumes."""


def exit_with(error: Exception) -> None:
    """One line on stderr, exit status 2: the message names the key or file and the fix (an OmegaConf error's key
    is added)."""
    key = getattr(error, "full_key", None)
    print(f"snapens: error: {str(error).splitlines()[0]}" + (f" ({key})" if key else ""), file=sys.stderr)
    sys.exit(2)
