"""Errors that cross the shell's packages."""


class FatalError(RuntimeError):
    """An error the node cannot recover from; the message is the one-line reason."""
