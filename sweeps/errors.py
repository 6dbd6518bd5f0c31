"""Errors of the gensweep commands (sweeps/cli.py prints each as one line)."""


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


class CommandFailed(Exception):
    """The input was right but the command could not do its job (a study that cannot be written): one line, exit 1."""
