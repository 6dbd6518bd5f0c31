"""The GPU check: two calls, each a few steps under their own time limits inside the call's budget (README.md beside
this file says how it is called and why so):

    bash .ci/gpu-check 1     # nvidia-smi, the CUDA tests, every model's graph check (NCSN first), the NCSN profile
    bash .ci/gpu-check 2     # the cold-compile tests, then `python -m bench all` in the time left
    bash .ci/gpu-check 1 --rehearse    # the same steps on this CPU, with tiny budgets (tests/bench/test_gpu_check.py)

A step that runs over is ended with every process it started (bench/processes.py), and the call goes on with the
next. CUDA graphs are off by default (train.cuda_graphs) until a GPU check shows them sound; the check turns them on
wherever it trains or benchmarks with them: the graph check passes cuda_graphs=True, the CUDA tests set it per test,
and bench all's benchmarks run under `python -m gpu_check.graphs_on` (graphs_on.py), which makes it their default.

Every result (a test's outcome, a model's graph status, a benchmark row, each step's end) is appended to the rows
file as a JSON line the moment it is known, so a stop loses little measured before it. The output folder ($OUT
on the device machine, else runs/gpu-check/call-N) holds check-N.json, check-N.log, check-N.rows.jsonl and
check-N.tar.gz (everything else).

`python -m gpu_check.gpu_check env|graphs|cleanup` (with .ci on PYTHONPATH) are the steps' own entry points.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench.common import BENCH_MODELS
from bench.processes import (
    MPS_DIR_ENV,
    ROWS_ENV,
    STEP_ENV,
    append_rows,
    end_all_groups,
    exit_on_signals,
    group_members,
    processes_with_env,
    read_rows,
    run_group,
    stop_mps,
    tail,
)
from genmodels.io import write_text_atomic
from gpu_check.graphs_on import with_graphs_on
from gpu_check.harness import (
    MAX_OUTPUT_FILES,
    WORK_ENV,
    WORK_PREFIX,
    clean_earlier_work,
    finish_output,
    write_fake_mps_control,
)

ROOT = Path(__file__).resolve().parents[2]
# seconds per call on the GPU; the device tool's timeout_s adds 40 (README.md), and with a machine's start the two
# calls leave room for call 1 run again while the machine is held
BUDGETS = {1: 160.0, 2: 250.0}
REHEARSAL_BUDGETS = {1: 100.0, 2: 100.0}
FINISH_S = 8.0  # kept back from the budget for the end: MPS, the tarball, the last JSON
GRAPH_FAIL_ENV = "GENSWEEP_GRAPH_CHECK_FAIL"  # models whose graph check raises (rehearsing the restart)
# NCSN's two networks first: the graphs that matter most (the longest trials, the Langevin sampler beside them) are
# the ones a call that runs short of time must not leave unreached
GRAPH_MODELS = ("ncsn", "ncsn_refinenet", *(m for m in BENCH_MODELS if not m.startswith("ncsn")))
MODULE = "gpu_check.gpu_check"  # this module, as its steps' children run it (python -m, .ci on PYTHONPATH)


@dataclass
class Step:
    """One step of a call: `run(ctx, allowed_s)` -> its record, run with at most `cap_s` seconds (None: what is
    left) and skipped when less than `min_s` is left after the later steps' `min_s`."""
    name: str
    run: Callable[[Context, float], dict[str, Any]]
    cap_s: float | None
    min_s: float = 10.0


@dataclass
class Context:
    call: int
    device: str
    rehearse: bool
    out: Path
    work: Path
    rows: Path
    python: str
    fid_weights: str | None
    models: list[str]
    log: Callable[[str], None] = print
    env: dict[str, str] = field(default_factory=dict)

    def child_env(self, step: str) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(ROOT / ".ci"), str(ROOT), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, **self.env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, ROWS_ENV: str(self.rows),
                STEP_ENV: step, WORK_ENV: str(self.work)}

    def run(self, step: str, command: list[str], timeout_s: float, extra_env: dict[str, str] | None = None,
            log_name: str | None = None, stop_when: Callable[[], bool] | None = None) -> dict[str, Any]:
        """`command` in a process group of its own, its output in the work folder; the end of it is logged when
        it did not end well."""
        log = self.work / (log_name or f"{step}.txt")
        with open(log, "a") as f:
            f.write(f"$ {' '.join(command)}\n")
        ended = run_group(command, timeout_s, log=log, env={**self.child_env(step), **(extra_env or {})}, cwd=ROOT,
                          stop_when=stop_when)
        if ended["status"] != "ok":
            for line in tail(log, 15):
                self.log(f"    | {line}")
        return ended


# ------------------------------------------------------------------------------------------------ the steps

def _env_step(ctx: Context, allowed: float) -> dict[str, Any]:
    return _quiet(ctx.run("env", [ctx.python, "-m", MODULE, "env", "--device", ctx.device,
                                  "--work", str(ctx.work)], allowed))


def _quiet(ended: dict[str, Any]) -> dict[str, Any]:
    ended.pop("pgid", None)  # the group is gone: its id says nothing in the record
    return ended


def _cuda_test_files() -> list[str]:
    """The test files with CUDA tests (those that ask torch.cuda.is_available()), and the custom norms' tests."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "cuda.is_available" in p.read_text(encoding="utf-8", errors="replace"))
    norms = "tests/genmodels/test_score_networks.py"
    return files + ([norms] if norms not in files and (ROOT / norms).exists() else [])


def _pytest(ctx: Context, step: str, selection: list[str], per_test_s: float, allowed: float) -> dict[str, Any]:
    """pytest on the CUDA test files: each test stopped after `per_test_s` by pytest-timeout (where the machine's
    pytest has it), the run interrupted (SIGINT, then SIGKILL 2 s later: `timeout -k`) just before the step's limit
    so that it still writes its JUnit XML, whose test cases become the step's rows."""
    xml = ctx.work / f"{step}.xml"
    per_test = ["--timeout", f"{per_test_s:g}"] if importlib.util.find_spec("pytest_timeout") else []
    if not per_test:
        ctx.log(f"    {step}: pytest-timeout is not installed here; no per-test limit, only the step's")
    stop_s = max(1.0, allowed - 3.0)  # SIGINT; SIGKILL 2 s later (pytest writes its XML at once), before the step's
    # -v: each test's node id is in the log before it runs (the one a stop interrupted is the last without an
    # outcome); failures' tracebacks short and without their captured output (the rows say why, in one line each)
    command = ["timeout", "-s", "INT", "-k", "2", f"{stop_s:.1f}", ctx.python, "-m", "pytest", "-v", "-rfE",
               "--tb=short", "--show-capture=no", "-p", "no:cacheprovider", f"--junitxml={xml}", *per_test,
               *selection, *_cuda_test_files()]
    ended = _quiet(ctx.run(step, command, allowed))
    if ended["rc"] in (124, 128 + 9, -9) and ended["status"] == "failed":
        ended["status"] = "timed out"  # `timeout` stopped it (124; -9 where its SIGKILL to the group ended it too)
    results = [dict(row, step=step) for row in _junit_rows(xml)]
    append_rows(results, "pytest", path=ctx.rows)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    ended["tests"] = counts
    if not xml.exists():
        ended["why"] = "no JUnit XML: pytest was killed before it could write one (its log has each test's line)"
    if ended["status"] == "timed out":  # the test that was running: its node id is in the log, its outcome is not
        running = [line.strip() for line in tail(ctx.work / f"{step}.txt", 400)
                   if "::" in line and " " not in line.strip()]
        if running:
            append_rows([{"test": running[-1], "outcome": "stopped", "step": step,
                          "message": f"running when the step's {allowed:.0f} s ran out"}], "pytest", path=ctx.rows)
            ended["stopped_in"] = running[-1]
    return ended


def _junit_rows(path: Path) -> list[dict[str, Any]]:
    """One row per test case of a pytest JUnit XML file: its node, outcome, seconds and the first line of why."""
    import xml.etree.ElementTree as ElementTree

    try:
        cases = ElementTree.parse(path).getroot().iter("testcase")
    except (OSError, ElementTree.ParseError):
        return []
    rows = []
    for case in cases:
        if not case.get("name"):
            continue  # the test a SIGINT interrupted: written without a name
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                outcome = name
                message = (found.get("message") or found.text or tag).strip().splitlines()[0][:300]
                break
        rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                     "seconds": float(case.get("time") or 0), "message": message})
    return rows


def _tests_step(ctx: Context, allowed: float) -> dict[str, Any]:
    """The CUDA tests, cold compiles left to the last step: each test stopped after its own limit."""
    return _pytest(ctx, "cuda-tests", ["-m", "not slow", "-k", "not compile"], 20.0 if ctx.rehearse else 45.0,
                   allowed)


def _compile_tests_step(ctx: Context, allowed: float) -> dict[str, Any]:
    """The tests that compile (cold: tens of seconds each), reduce-overhead's own CUDA graphs among them: call 2's
    first step, so that call 1's time goes to the CUDA tests and the graph check."""
    return _pytest(ctx, "compile-tests", ["-k", "compile"], 10.0 if ctx.rehearse else 75.0, allowed)


def _graphs_step(ctx: Context, allowed: float) -> dict[str, Any]:
    """Every model trained a few steps through Experiment with CUDA graphs on, in one process, its graph status
    recorded; a model that fails ends that process (its CUDA state may be broken) and a new one goes on with the
    models after it."""
    deadline = time.monotonic() + allowed
    remaining, runs, start = list(ctx.models), [], time.monotonic()
    size = "small" if ctx.rehearse else "full"
    while remaining and (left := deadline - time.monotonic()) > 1:
        command = [ctx.python, "-m", MODULE, "graphs", "--device", ctx.device,
                   "--models", ",".join(remaining), "--size", size, *(["--steps", "3"] if ctx.rehearse else [])]
        extra = {GRAPH_FAIL_ENV: os.environ.get(GRAPH_FAIL_ENV, "iwae" if ctx.rehearse else "")}
        ended = _quiet(ctx.run("graphs", command, left, extra))
        runs.append(ended)
        done = {r["model"] for r in read_rows(ctx.rows) if r.get("benchmark") == "graphs"}
        progress = [m for m in remaining if m in done]
        remaining = [m for m in remaining if m not in done]
        if ended["status"] == "ok" or not remaining:
            break
        if ended["status"] == "timed out" or not progress:  # the model it was on gets a row saying so
            why = "timed out" if ended["status"] == "timed out" else f"its process ended (rc {ended['rc']})"
            append_rows([{"model": remaining[0], "what": "graph check", "captured": None,
                          "error": f"{why}; see graphs.txt in the tarball"}], "graphs", path=ctx.rows)
            remaining = remaining[1:]
            if ended["status"] == "timed out":
                break
    rows = [r for r in read_rows(ctx.rows) if r.get("benchmark") == "graphs"]
    errors = {r["model"]: r["error"] for r in rows if r.get("error") is not None}
    status = "ok" if rows and not errors and not remaining else "failed"
    if runs and runs[-1]["status"] == "timed out":
        status = "timed out"
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "processes": len(runs),
            "models": len(rows), "captured": [r["model"] for r in rows if r.get("captured")],
            "status_by_model": {r["model"]: r.get("graph_status") for r in rows}, "errors": errors,
            "not_reached": remaining}


def _profile_step(ctx: Context, allowed: float) -> dict[str, Any]:
    small = ["--size", "small", "--steps", "2", "--warmup", "1"] if ctx.rehearse else []
    return _quiet(ctx.run("profile", [ctx.python, "-m", "bench", "profile", "--model", "ncsn",
                                      "--cuda-graphs", "off", "--device", ctx.device,
                                      "--json", str(ctx.work / "profile-ncsn.json"), *small], allowed))


def _bench_all_step(ctx: Context, allowed: float) -> dict[str, Any]:
    """`bench all` in this process (each benchmark is a process group of its own under it), its budget what the
    call has left less the time to end its last step."""
    from bench import run_all

    start = time.monotonic()
    budget = max(0.0, allowed - 5.0)
    args = ["--budget-s", f"{budget:.0f}", "--device", ctx.device, "--models", ",".join(ctx.models),
            "--json", str(ctx.work / "all.json"), "--rows", str(ctx.rows), "--logs", str(ctx.work / "bench"),
            "--work", str(ctx.work)]
    if ctx.fid_weights:
        args += ["--fid-weights", ctx.fid_weights]
    if ctx.rehearse:
        args += ["--mps", "on", "--pack-trials", "1"]  # one trial with graphs, one under the stand-in MPS
    os.environ.update({WORK_ENV: str(ctx.work), STEP_ENV: "bench all"})
    # its lines into the call's log; each benchmark with train.cuda_graphs on unless it sets it (graphs_on.py)
    with contextlib.redirect_stdout(_Lines(lambda line: ctx.log(f"    {line}"))), with_graphs_on(run_all):
        report = run_all.main(args)
    for run in report["runs"]:
        for line in run.get("error", []):
            ctx.log(f"    | {run['benchmark']}: {line}")
    statuses = {r["benchmark"] + (f" {r['args'][1]}" if r["benchmark"] == "train" else ""): r["status"]
                for r in report["runs"]}
    bad = [k for k, v in statuses.items() if v in ("failed", "timed out")]
    return {"status": "ok" if not bad else "failed" if any(statuses[k] == "failed" for k in bad) else "timed out",
            "seconds": round(time.monotonic() - start, 1), "budget_s": round(budget, 1), "benchmarks": statuses}


def _pack_overrun_step(ctx: Context, allowed: float) -> dict[str, Any]:
    """Rehearsal only: a pack that runs into its limit with its MPS daemon up (the stand-in, deaf to quit) and
    eight spawned workers starting, as a GPU's pack can. One trial's row comes first; the limit, 2 s after that row
    (a fixed limit missed the row on a slower CI machine), ends the rest. Says what was left afterwards: the
    group's members, the daemon."""
    step, mps = "pack-overrun", ctx.work / "mps"
    command = [ctx.python, "-m", "bench", "pack", "--device", ctx.device, "--model", "vae",
               "--cuda-graphs", "", "--mps", "--trials", "8", "--steps", "200", "--warmup", "1",
               "--json", str(ctx.work / "pack-overrun.json")]
    first_row: list[float] = []

    def two_s_after_first_row() -> bool:
        if not first_row and any(r.get("step") == step for r in read_rows(ctx.rows)):
            first_row.append(time.monotonic())
        return bool(first_row) and time.monotonic() > first_row[0] + 2.0

    ended = ctx.run(step, command, allowed, {MPS_DIR_ENV: str(mps)}, stop_when=two_s_after_first_row)
    ended["mps"] = stop_mps(mps)
    ended["rows_kept"] = sum(r.get("step") == step for r in read_rows(ctx.rows))
    ended["group_left"] = group_members(ended.pop("pgid", 0) or -1)
    ended["mps_left"] = processes_with_env("CUDA_MPS_PIPE_DIRECTORY", str(mps / "pipe"))
    if ended["status"] == "timed out" and ended["rows_kept"] and not ended["group_left"] and not ended["mps_left"]:
        ended["status"] = "ok"  # what the rehearsal is for: stopped at its limit, its row kept, nothing left
        ended["stopped_at_limit"] = True
    return ended


class _Lines(io.TextIOBase):
    """A text stream that hands each whole line to `write_line`."""

    def __init__(self, write_line: Callable[[str], None]):
        self.write_line, self.buffer = write_line, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            self.write_line(line)
        return len(text)


def plan(call: int, rehearse: bool) -> list[Step]:
    """Call 1: what turning CUDA graphs on by default waits for (the CUDA tests, every model's graph check, NCSN's
    first), then the NCSN profile in what is left. Call 2: the cold-compile tests (reduce-overhead's CUDA graphs),
    then bench all."""
    if call == 1:
        if rehearse:
            return [Step("env", _env_step, 15, 5), Step("cuda-tests", _tests_step, 45, 10),
                    Step("graphs", _graphs_step, 30, 10), Step("profile", _profile_step, 20, 5)]
        return [Step("env", _env_step, 15, 5), Step("cuda-tests", _tests_step, 80, 20),
                Step("graphs", _graphs_step, 60, 20), Step("profile", _profile_step, 35, 10)]
    if rehearse:
        return [Step("env", _env_step, 15, 5), Step("compile-tests", _compile_tests_step, 15, 5),
                Step("bench-all", _bench_all_step, None, 30), Step("pack-overrun", _pack_overrun_step, 40, 25)]
    return [Step("env", _env_step, 15, 5), Step("compile-tests", _compile_tests_step, 80, 20),
            Step("bench-all", _bench_all_step, None, 30)]


# ------------------------------------------------------------------------------------------------ a call

def run_call(call: int, steps: list[Step], ctx: Context, budget_s: float) -> dict[str, Any]:
    """Run `steps` within `budget_s` (FINISH_S of it kept for the end), each step's record appended to the rows
    file and the call's JSON rewritten after each; the output folder finished (MAX_OUTPUT_FILES at most) however
    the call ends."""
    start = time.monotonic()
    deadline = start + budget_s - FINISH_S
    summary: dict[str, Any] = {"call": call, "device": ctx.device, "rehearse": ctx.rehearse, "budget_s": budget_s,
                               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": [], "rows": []}
    json_path = ctx.out / f"check-{call}.json"

    def save(final: bool = False) -> None:
        summary["elapsed_s"] = round(time.monotonic() - start, 1)
        summary["rows"] = [r for r in read_rows(ctx.rows)]
        summary["partial"] = not final
        write_text_atomic(json_path, json.dumps(summary, indent=1, default=str))

    try:
        for i, step in enumerate(steps):
            reserve = sum(s.min_s for s in steps[i + 1:])
            left = deadline - time.monotonic()
            allowed = min(step.cap_s if step.cap_s is not None else float("inf"), left - reserve)
            if allowed < step.min_s:
                allowed = min(step.cap_s or left, left)  # the later steps' reserve yields to one that fits alone
            if allowed < step.min_s:
                record = {"step": step.name, "status": "skipped", "seconds": 0.0,
                          "why": f"{max(left, 0):.0f} s left, {step.min_s:.0f} s needed"}
            else:
                ctx.log(f"[{time.monotonic() - start:6.1f} s] {step.name}: started, {allowed:.0f} s at most")
                t0 = time.monotonic()
                try:
                    result = step.run(ctx, allowed)
                except Exception as error:  # noqa: BLE001 - one step's fault is its record; the call goes on
                    result = {"status": "failed", "error": traceback.format_exception_only(error)[-1].strip()}
                except BaseException as stop:  # the call itself stopped (SIGTERM, Ctrl-C): said, then the end
                    why = f"the call was stopped ({type(stop).__name__} {getattr(stop, 'code', '')})".strip()
                    record = {"step": step.name, "status": "stopped", "allowed_s": round(allowed, 1),
                              "seconds": round(time.monotonic() - t0, 1), "why": why}
                    summary["steps"].append(record)
                    append_rows([{"kind": "step", **record}], "gpu-check", path=ctx.rows)
                    ctx.log(f"[{time.monotonic() - start:6.1f} s] {step.name}: stopped: {why}")
                    raise
                result.setdefault("seconds", round(time.monotonic() - t0, 1))
                record = {"step": step.name, "allowed_s": round(allowed, 1), **result}
            summary["steps"].append(record)
            append_rows([{"kind": "step", **record}], "gpu-check", path=ctx.rows)
            extra = {k: v for k, v in record.items() if k not in ("step", "status", "seconds", "allowed_s")}
            ctx.log(f"[{time.monotonic() - start:6.1f} s] {step.name}: {record['status']} in "
                    f"{record['seconds']:.1f} s {json.dumps(extra, default=str) if extra else ''}".rstrip())
            save()
    finally:
        end_all_groups()
        for note in stop_mps(ctx.work / "mps"):
            ctx.log(f"mps: {note}")
        save(final=True)
        kept = [json_path.name, f"check-{call}.log", ctx.rows.name]
        files = finish_output(ctx.out, ctx.work, f"check-{call}.tar.gz", keep=kept)
        summary["output"] = files
        ctx.log(f"[{time.monotonic() - start:6.1f} s] call {call} done: {len(files['files'])} files in {ctx.out} "
                f"({', '.join(files['files'])}); the tarball holds {len(files['tarball'])}")
        if len(files["files"]) > MAX_OUTPUT_FILES:
            ctx.log(f"WARNING: {len(files['files'])} files in {ctx.out}, more than {MAX_OUTPUT_FILES}")
        save(final=True)
    return summary


def _call_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bash .ci/gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("call", type=int, choices=[1, 2])
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for the whole call (default {BUDGETS[1]:.0f} for 1, {BUDGETS[2]:.0f} for 2; "
                        f"rehearsing: {REHEARSAL_BUDGETS[1]:.0f} and {REHEARSAL_BUDGETS[2]:.0f})")
    p.add_argument("--rehearse", action="store_true",
                   help="the same steps on the CPU with tiny budgets and sizes: a stand-in MPS daemon that ignores "
                        "quit, one model's graph check failing on purpose (iwae), pack run into its limit")
    p.add_argument("--device", default=None, help="default: cuda (cpu when rehearsing)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else runs/gpu-check/call-N)")
    p.add_argument("--models", default=None, help="comma-separated (default: all; rehearsing call 2: vae)")
    p.add_argument("--fid-weights", default=os.environ.get("FID_WEIGHTS"),
                   help="Inception weights for bench all's fid and trial rows (default $FID_WEIGHTS; else the "
                        "standin network)")
    args = p.parse_args(argv)
    exit_on_signals()
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check" / f"call-{args.call}")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"check-{args.call}.*"):
        old.unlink()
    work = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{args.call}-"))
    log_path = out / f"check-{args.call}.log"
    log_file = open(log_path, "a", encoding="utf-8")

    def log(line: str) -> None:
        print(line, file=sys.__stdout__, flush=True)  # not sys.stdout: bench all's lines are redirected here
        log_file.write(line + "\n")
        log_file.flush()

    for note in clean_earlier_work(keep=work):
        log(f"cleanup: {note}")
    device = args.device or ("cpu" if args.rehearse else "cuda")
    # call 1's graph check in GRAPH_MODELS' order (NCSN first); call 2's bench all in BENCH_MODELS' (its shares)
    default_models = ",".join(GRAPH_MODELS) if args.call == 1 else "vae" if args.rehearse else ",".join(BENCH_MODELS)
    ctx = Context(call=args.call, device=device, rehearse=args.rehearse, out=out, work=work,
                  rows=out / f"check-{args.call}.rows.jsonl", python=sys.executable, fid_weights=args.fid_weights,
                  models=[m for m in (args.models or default_models).split(",") if m], log=log)
    if args.rehearse:
        # one torch thread per process, as the tests run: a shared small CPU's threads otherwise fight (OpenMP's
        # spinning made one epoch 40 times slower beside another job here)
        ctx.env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
        write_fake_mps_control(work / "bin", stubborn=True)
        ctx.env["PATH"] = f"{work / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        os.environ["PATH"] = ctx.env["PATH"]  # bench all's children inherit this process's environment
    budget = args.budget_s or (REHEARSAL_BUDGETS if args.rehearse else BUDGETS)[args.call]
    log(f"gpu-check call {args.call} on {device}{' (rehearsal)' if args.rehearse else ''}: budget {budget:.0f} s, "
        f"output {out}, work {work}")
    try:
        summary = run_call(args.call, plan(args.call, args.rehearse), ctx, budget)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        log_file.close()
    return 0 if all(s["status"] in ("ok", "skipped") for s in summary["steps"]) else 1


# ------------------------------------------------------------------------------------------------ step entry points

def _env_main(argv: list[str]) -> None:
    """nvidia-smi (to the work folder) and what torch sees, as one row."""
    import subprocess

    p = argparse.ArgumentParser(prog=f"python -m {MODULE} env")
    p.add_argument("--device", default="cuda")
    p.add_argument("--work", type=Path, required=True)
    args = p.parse_args(argv)
    row: dict[str, Any] = {"what": "environment", "python": sys.version.split()[0]}
    smi = shutil.which("nvidia-smi")
    if smi:
        for name, extra in (("nvidia-smi.txt", []), ("nvidia-smi-query.csv", [
                "--query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,compute_mode",
                "--format=csv"])):
            try:
                done = subprocess.run([smi, *extra], capture_output=True, text=True, timeout=10)
                (args.work / name).write_text(done.stdout + done.stderr)
                if extra:
                    row["nvidia_smi"] = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
            except subprocess.TimeoutExpired:
                row["nvidia_smi"] = "timed out after 10 s"
    else:
        row["nvidia_smi"] = "not on PATH"
    import torch

    row.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(), cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
               threads=torch.get_num_threads(), cpus=os.cpu_count())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                   multiprocessors=props.multi_processor_count)
    elif args.device.startswith("cuda"):
        row["error"] = "torch sees no CUDA device"
    print(json.dumps(row, indent=1))
    append_rows([row], "env")


def _graphs_main(argv: list[str]) -> None:
    """Each model trained through Experiment (the public API), CUDA graphs on: an epoch that captures (warm-up
    steps, the capture and its self-check, replays) and a timed epoch of replays; VQ-VAE with its stage 2 starting
    at epoch 2 (a second capture). One row per model with whatever graph status the run exposes: the trainer's
    `graph_status` and `graph_captured` from each epoch's metrics, `Experiment.graph_captured` and any other public
    `graph*` attribute, and the warnings that name a graph. Exits 3 after a model that raised (the parent goes on
    with the next in a new process)."""
    p = argparse.ArgumentParser(prog=f"python -m {MODULE} graphs")
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", default=",".join(GRAPH_MODELS))
    p.add_argument("--size", choices=["small", "full"], default="full")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch (default 8: 3 warm-up, capture, replays)")
    args = p.parse_args(argv)
    import torch

    from bench.common import bench_config, bench_images, peak_memory, reset_memory, timed_run
    from genmodels.experiment import make_experiment

    device = torch.device(args.device)
    fail = {m for m in os.environ.get(GRAPH_FAIL_ENV, "").split(",") if m}
    for name in [m for m in args.models.split(",") if m]:
        row: dict[str, Any] = {"model": name, "what": "graph check", "size": args.size, "captured": None,
                               "graph_status": None, "epochs": [], "error": None}
        start = time.perf_counter()
        exp = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model_name, params = bench_config(name, args.size)
                epochs = 2
                if name == "vqvae":
                    params["stage1_epochs"] = 1  # epoch 2 trains the prior: the stage-2 capture
                bs = int(params["batch_size"])
                images = bench_images((epochs * args.steps + 1) * bs)
                reset_memory(device)
                exp = make_experiment(model_name, {**params, "steps_per_epoch": args.steps, "eval_images": bs,
                                                   "cuda_graphs": True}, images, images[:bs], device=device)
                if name in fail:
                    raise RuntimeError(f"injected by ${GRAPH_FAIL_ENV} (rehearsing a model that fails)")
                for epoch in range(epochs):
                    metrics: dict[str, Any] = {}
                    seconds = timed_run(lambda: metrics.update(exp.train_epoch()), device)
                    row["epochs"].append({"seconds": round(seconds, 3), "images_per_s": args.steps * bs / seconds,
                                          **{k: v for k, v in metrics.items() if "graph" in k or k == "train_loss"}})
                row["peak_memory_mib"] = (peak_memory(device) or 0) / 2 ** 20 or None
            except Exception as error:  # noqa: BLE001 - the row says what failed; the process ends after it
                row["error"] = traceback.format_exception_only(error)[-1].strip()[:500]
                row["error_type"] = type(error).__name__
        row["seconds"] = round(time.perf_counter() - start, 2)
        if exp is not None:
            row["captured"] = bool(exp.graph_captured)
            row["graph_status"] = row["epochs"][-1].get("graph_status") if row["epochs"] else None
            for attr in (a for a in dir(type(exp)) if "graph" in a and not a.startswith("_")):
                try:
                    value = getattr(exp, attr)
                except Exception as error:  # noqa: BLE001
                    value = f"{type(error).__name__}: {error}"
                if not callable(value):
                    row[f"experiment.{attr}"] = value if isinstance(value, (bool, int, float, str, type(None))) \
                        else str(value)
            row["steps_done"] = exp.step
        row["warnings"] = sorted({str(w.message).splitlines()[0][:300] for w in caught
                                  if "graph" in str(w.message).lower()})
        print(json.dumps(row, default=str), flush=True)
        append_rows([row], "graphs")
        if row["error"] is not None:
            sys.exit(3)
        exp = None  # its graphs' memory pools go before the next model's capture
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _cleanup_main(argv: list[str]) -> None:
    """What a killed call left on this machine: its processes, MPS daemon and work folder (.ci/gpu-check's trap)."""
    for note in clean_earlier_work():
        print(f"gpu-check cleanup: {note}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    entry = {"env": _env_main, "graphs": _graphs_main, "cleanup": _cleanup_main}.get(argv[0] if argv else "")
    if entry:
        entry(argv[1:])
        return 0
    return _call_main(argv)


if __name__ == "__main__":
    sys.exit(main())
