"""A pytest plugin for the GPU check (`python -m pytest -p genmodels.bench.pytest_rows ...`):

- each test's outcome (passed, failed, error, skipped; its seconds and the first line of why) is appended as a JSON
  line to $GENSWEEP_BENCH_ROWS as soon as the test ends, so a run stopped for time keeps every result before it;
- each test is stopped after $GENSWEEP_TEST_TIMEOUT_S seconds (setup, call and teardown together): SIGALRM raises
  TestTimedOut in it, the test fails with that, and the run goes on with the next test. A test stuck inside one C
  call (a CUDA kernel that never ends) is stopped only when the call returns: the step's own time limit ends that;
- each test's start is written to stderr ("[gpu-check] start NODEID"), so the log of a run stopped for time says
  which test was running.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from genmodels.bench.harness import append_rows

TIMEOUT_ENV = "GENSWEEP_TEST_TIMEOUT_S"
TEARDOWN_S = 10.0  # at least this for the teardown of a test that ran out of time


class TestTimedOut(BaseException):
    """Raised in a test that ran past its time. A BaseException, so that the test's own `except Exception` (or
    `pytest.raises(RuntimeError)`) does not swallow it."""


_results: dict[str, dict[str, Any]] = {}
_deadlines: dict[str, float] = {}


def _limit() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV) or 0)
    except ValueError:
        return 0.0


@contextmanager
def _alarm(item: pytest.Item, teardown: bool = False) -> Iterator[None]:
    """SIGALRM at the test's deadline, for one phase (setup, call or teardown). The teardown of a test that ran
    out of time gets a few seconds of its own, so that its fixtures still clean up."""
    deadline = _deadlines.get(item.nodeid)
    if deadline is None or not hasattr(signal, "setitimer"):
        yield
        return
    limit = _limit()

    def expired(signum, frame):
        raise TestTimedOut(f"timed out after {limit:g} s ({TIMEOUT_ENV})")

    left = deadline - time.monotonic()
    if teardown:
        left = max(left, min(limit, TEARDOWN_S))
    if left <= 0:
        raise TestTimedOut(f"timed out after {limit:g} s ({TIMEOUT_ENV})")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, left)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    print(f"[gpu-check] start {item.nodeid}", file=sys.__stderr__, flush=True)
    _results[item.nodeid] = {"test": item.nodeid, "outcome": "passed", "seconds": 0.0, "message": None}
    if _limit() > 0:
        _deadlines[item.nodeid] = time.monotonic() + _limit()
    yield
    _deadlines.pop(item.nodeid, None)
    result = _results.pop(item.nodeid, None)
    if result is not None:
        result["seconds"] = round(result["seconds"], 2)
        append_rows([result], "pytest")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _alarm(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _alarm(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    with _alarm(item, teardown=True):
        yield


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    result = _results.get(report.nodeid)
    if result is None:
        return
    result["seconds"] += report.duration
    if report.skipped and result["outcome"] == "passed":
        result["outcome"] = "skipped"
        longrepr = report.longrepr
        result["message"] = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr).strip()[:300]
    elif report.failed and result["outcome"] in ("passed", "skipped"):
        result["outcome"] = "failed" if report.when == "call" else "error"
        result["message"] = _why(report)
        if result["outcome"] == "error":
            result["message"] = f"in {report.when}: {result['message']}"


def _why(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return text.strip().splitlines()[0][:300] if text.strip() else "failed"
