"""The one exception type that entry points turn into a one-line message instead of a traceback."""


class SnapensError(Exception):
    """A problem with the user's input (config, files, data) that the message itself explains how to fix."""
