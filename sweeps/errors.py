"""Errors of the sweep CLIs (run.py, leaderboard.py, report.py)."""


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""
