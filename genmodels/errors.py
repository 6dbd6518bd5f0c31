"""Errors that reach the user as one line."""


class ResourceUnavailable(RuntimeError):
    """Data or weights are missing and cannot be downloaded; the message is one line naming the flag that fixes it."""
