"""The GPU check rehearsed on the CPU (bench/processes.py, .ci/gpu_check/): a step that overruns is ended with every
process it started, rows written before a kill survive it, an MPS daemon that ignores `quit` is still stopped, the
FID row falls back to the standin, and the pytest step stops a test that overruns and keeps each test's outcome. The
whole calls, rehearsed on the CPU, are the slow tests at the end."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import ROOT

from bench import processes
from bench.common import BENCH_MODELS
from bench.processes import ROWS_ENV, read_rows, run_group

sys.path.insert(0, str(ROOT / ".ci"))  # the GPU check's modules: package gpu_check, as .ci/gpu-check runs them
from gpu_check import gpu_check, harness  # noqa: E402

PY = sys.executable


def alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may never reap what it inherits)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def wait_for(path: Path, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [PY, str(path)]


def test_a_step_that_overruns_is_ended_with_its_grandchildren(tmp_path):
    """SIGTERM to the whole group at the limit, SIGKILL to what ignores it: nothing the step started stays."""
    pids = tmp_path / "pids"
    command = script(tmp_path, "overrun.py", f"""
        import signal, subprocess, sys, time
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        stubborn = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        open({str(pids)!r}, "w").write(f"{{sleeper.pid}} {{stubborn.pid}}")
        time.sleep(60)
    """)
    start = time.monotonic()
    ended = run_group(command, timeout_s=3.0, log=tmp_path / "log.txt", grace_s=0.5)
    assert ended["status"] == "timed out" and time.monotonic() - start < 3.0 + 6
    children = [int(p) for p in pids.read_text().split()]
    assert len(children) == 2 and not any(alive(pid) for pid in children)
    assert processes.group_members(ended["pgid"]) == []


def test_a_step_is_ended_when_its_stop_condition_holds(tmp_path):
    """stop_when ends the group before its limit (pack-overrun: 2 s after the first row, however slow the machine)."""
    flag = tmp_path / "flag"
    command = script(tmp_path, "flags.py", f"""
        import time
        time.sleep(0.5)
        open({str(flag)!r}, "w").write("up")
        time.sleep(60)
    """)
    start = time.monotonic()
    ended = run_group(command, timeout_s=30.0, grace_s=0.5, stop_when=flag.exists)
    assert ended["status"] == "timed out" and flag.exists() and time.monotonic() - start < 10
    assert processes.group_members(ended["pgid"]) == []
    quick = run_group(script(tmp_path, "quick.py", "pass"), timeout_s=30.0, stop_when=lambda: False)
    assert quick["status"] == "ok" and quick["rc"] == 0


def test_workers_left_behind_by_a_step_that_ended_are_ended(tmp_path):
    """subprocess.run(timeout=) would leave these: a step's leader exits, its spawned worker runs on."""
    pid_file = tmp_path / "worker"
    command = script(tmp_path, "leaves.py", f"""
        import subprocess, sys
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(worker.pid))
    """)
    ended = run_group(command, timeout_s=20.0, log=tmp_path / "log.txt")
    assert ended["status"] == "ok" and ended["rc"] == 0 and ended["left_behind"] == 1
    assert not alive(int(pid_file.read_text()))


def test_rows_written_before_a_kill_survive_it(tmp_path):
    rows = tmp_path / "rows.jsonl"
    command = script(tmp_path, "rows.py", f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from bench.processes import append_rows
        append_rows([{{"model": "a"}}], "train")
        append_rows([{{"model": "b"}}], "train")
        open({str(rows)!r}, "a").write('{{"model": "c", "cut sh')  # a row the kill cut short
        time.sleep(60)
    """)
    env = {**os.environ, ROWS_ENV: str(rows), processes.STEP_ENV: "train --models a"}
    ended = run_group(command, timeout_s=3.0, env=env, grace_s=0.5)
    assert ended["status"] == "timed out"
    got = read_rows(rows)
    assert [r["model"] for r in got] == ["a", "b"]
    assert all(r["benchmark"] == "train" and r["step"] == "train --models a" and r["t"] > 0 for r in got)


def test_a_benchmarks_partial_reports_append_each_row_once(tmp_path, monkeypatch):
    from bench.common import start_rows, write_json

    monkeypatch.setenv(ROWS_ENV, str(tmp_path / "rows.jsonl"))
    start_rows()
    report = tmp_path / "report.json"
    rows = []
    for i in range(3):
        rows.append({"i": i})
        write_json(report, {"benchmark": "pack", "partial": True, "rows": rows})
        assert json.loads(report.read_text())["rows"] == rows  # the whole report at every write
    write_json(report, {"benchmark": "pack", "rows": rows, "device": "cpu"})  # the end's report: nothing new
    assert [r["i"] for r in read_rows(tmp_path / "rows.jsonl")] == [0, 1, 2]
    assert not list(tmp_path.glob(".*.tmp"))


def test_pack_keeps_the_rows_it_measured_before_it_was_stopped(tmp_path, monkeypatch):
    import bench.pack as pack
    import bench.suite as bench

    rounds = []

    def trials(n, *args, **kwargs):
        rounds.append(n)
        if len(rounds) == 3:  # the third round: the step's limit (SIGTERM raises SystemExit in the benchmark)
            raise SystemExit(143)
        return [dict(rank=r, start=0.0, end=1.0, images=10, peak_memory_bytes=None, graph_captured=False)
                for r in range(n)]

    monkeypatch.setattr(pack, "run_concurrent_trials", trials)
    monkeypatch.setenv(ROWS_ENV, str(tmp_path / "rows.jsonl"))
    with pytest.raises(SystemExit):
        bench.main(["pack", "--device", "cpu", "--trials", "2", "--cuda-graphs", "on,off",
                    "--json", str(tmp_path / "pack.json")])
    written = json.loads((tmp_path / "pack.json").read_text())
    assert written["partial"] and [r["trials"] for r in written["rows"]] == [1, 2]
    assert [(r["benchmark"], r["trials"]) for r in read_rows(tmp_path / "rows.jsonl")] == [("pack", 1), ("pack", 2)]


def test_a_bench_all_step_stopped_for_time_keeps_the_rows_it_wrote(monkeypatch):
    """run_step ends a step's whole group at its share (run_group); what the step wrote before is its report."""
    import bench.run_all as run_all

    def stopped(command, timeout_s, **kwargs):
        out = Path(command[command.index("--json") + 1])
        out.write_text(json.dumps({"benchmark": "train", "partial": True, "rows": [{"model": "vae"}]}))
        return {"status": "timed out", "rc": -15, "seconds": timeout_s, "left_behind": 2, "pgid": 0}

    monkeypatch.setattr(run_all, "run_group", stopped)
    result = run_all.run_step("train", ["--models", "vae"], "cpu", timeout_s=1)
    assert result["status"] == "timed out" and result["report"]["rows"] == [{"model": "vae"}]
    assert result["left_behind"] == 2


def test_bench_all_plans_the_standin_fid_without_weights_and_fits_its_budget():
    from bench.run_all import plan

    def args(**changes):
        return Namespace(**{"models": ",".join(BENCH_MODELS), "device": "cuda", "budget_s": 225.0,
                            "fid_weights": None, "mps": "auto", "pack_trials": None, **changes})

    steps = {name: extra for name, extra, _ in plan(args())}
    assert steps["fid"] == ["--networks", "standin"]
    assert steps["pack"][:2] == ["--trials", "4"] and "--mps" in steps["pack"]
    assert "--fid-weights" not in steps["trial"]
    assert sum(share for _, _, share in plan(args())) <= 225.0 + 1e-9
    assert not any("--compile" in extra for _, extra, _ in plan(args()))  # a cold compile does not fit 225 s
    with_weights = {name: extra for name, extra, _ in plan(args(fid_weights="w.pt"))}
    assert with_weights["fid"] == ["--networks", "standin,inception", "--fid-weights", "w.pt"]  # the standin first
    assert "--mps" not in {n: e for n, e, _ in plan(args(device="cpu"))}["pack"]
    assert "--mps" in {n: e for n, e, _ in plan(args(device="cpu", mps="on"))}["pack"]


def test_the_fid_bench_keeps_the_standin_row_when_inception_fails(monkeypatch):
    import bench.suite as bench
    import genmodels.metrics.fid as fid

    real = fid.FIDScorer

    def scorer(network, *args, **kwargs):
        if network == "inception":
            raise OSError("no Inception weights on an offline machine")
        return real(network, *args, **kwargs)

    monkeypatch.setattr(fid, "FIDScorer", scorer)
    report = bench.main(["fid", "--device", "cpu", "--networks", "inception,standin", "--n", "8", "--batch-size", "8",
                         "--kid-subsets", "0"])
    rows = report["rows"]
    assert rows[0]["network"] == "inception" and rows[0]["what"] == "failed" and "offline" in rows[0]["error"]
    assert [r["what"] for r in rows[1:]] == ["feature extraction", "FID from stats (D=128)"]
    assert rows[1]["value"] > 0


def test_a_stopped_pack_leaves_no_mps_daemon_and_no_worker(tmp_path):
    """pack's daemon leaves its session (no group kill reaches it) and this stand-in ignores quit, as a wedged
    real one would: SIGTERM to the step's group ends it and its worker (pack's `finally` asks the daemon to quit),
    stop_mps ends the daemon."""
    base, worker = tmp_path / "mps", tmp_path / "worker"
    harness.write_fake_mps_control(tmp_path / "bin", stubborn=True)
    command = script(tmp_path, "pack.py", f"""
        import os, signal, subprocess, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from bench.processes import exit_on_signals
        from bench.pack import mps_daemon
        exit_on_signals()
        with mps_daemon() as error:
            assert error is None, error
            w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            open({str(worker)!r}, "w").write(str(w.pid))
            os.killpg(os.getpgrp(), signal.SIGTERM)  # what run_group sends the step's group at its limit
            time.sleep(60)
    """)
    env = {**os.environ, processes.MPS_DIR_ENV: str(base),
           "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    ended = run_group(command, timeout_s=30.0, env=env, log=tmp_path / "log.txt", grace_s=2.0)
    assert ended["rc"] == 128 + signal.SIGTERM, processes.tail(tmp_path / "log.txt")  # its `finally` ran: quit
    assert not alive(int(worker.read_text()))
    daemon = int((base / "pipe" / "fake.pid").read_text())
    assert alive(daemon)  # out of the group's reach, and deaf to quit
    os.environ["PATH"] = env["PATH"]
    try:
        notes = processes.stop_mps(base, grace_s=0.5)
    finally:
        os.environ["PATH"] = os.environ["PATH"].split(os.pathsep, 1)[1]
    assert not alive(daemon) and any("SIGTERM" in n for n in notes) and not (base / "pipe").exists()


def _context(tmp_path: Path, call: int = 9, **changes) -> gpu_check.Context:
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    log = out / f"check-{call}.log"

    def write(line: str) -> None:
        with open(log, "a") as f:
            f.write(line + "\n")

    return gpu_check.Context(**{"call": call, "device": "cpu", "rehearse": True, "out": out, "work": work,
                                "rows": out / f"check-{call}.rows.jsonl", "python": PY, "fid_weights": None,
                                "models": ["vae"], "log": write, **changes})


def test_a_call_runs_every_step_in_its_limit(tmp_path):
    ctx = _context(tmp_path)
    (ctx.out / "stray.txt").write_text("a file some step left in the output folder")

    def measures(ctx, allowed):
        for i in range(5):
            (ctx.work / f"extra-{i}.txt").write_text("x")
        return ctx.run("measures", [PY, "-c", "from bench.processes import append_rows; "
                                                "append_rows([{'value': 1}, {'value': 2}], 'measures')"], allowed)

    def overruns(ctx, allowed):
        return ctx.run("overruns", [PY, "-c", "from bench.processes import append_rows; import time; "
                                              "append_rows([{'value': 3}], 'overruns'); time.sleep(60)"], allowed)

    def raises(ctx, allowed):
        raise ValueError("a fault in the step itself")

    steps = [gpu_check.Step("measures", measures, 20, 1), gpu_check.Step("overruns", overruns, 2, 1),
             gpu_check.Step("fails", lambda c, a: c.run("fails", [PY, "-c", "raise SystemExit(2)"], a), 20, 1),
             gpu_check.Step("raises", raises, 5, 1), gpu_check.Step("too-big", raises, None, 1000)]
    start = time.monotonic()
    summary = gpu_check.run_call(9, steps, ctx, budget_s=60)
    assert time.monotonic() - start < 30
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"measures": "ok", "overruns": "timed out", "fails": "failed", "raises": "failed",
                      "too-big": "skipped"}
    assert "a fault in the step itself" in summary["steps"][3]["error"]
    with tarfile.open(ctx.out / "check-9.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"measures.txt", "overruns.txt", "fails.txt", "out-extra/stray.txt"} <= names
    assert {f"extra-{i}.txt" for i in range(5)} <= names
    saved = json.loads((ctx.out / "check-9.json").read_text())
    assert not saved["partial"] and [s["step"] for s in saved["steps"]] == list(status)
    values = [r["value"] for r in saved["rows"] if "value" in r]
    assert values == [1, 2, 3]  # the overrunning step's row, written before its kill, is kept
    assert [r["step"] for r in saved["rows"] if r.get("kind") == "step"] == list(status)
    log = (ctx.out / "check-9.log").read_text()
    assert "overruns: timed out" in log and "call 9 done" in log


def test_a_call_stopped_by_sigterm_still_ends_its_step_and_writes_its_files(tmp_path):
    """The device tool (or a person) stops the whole call: the running step's group is ended, the step is
    recorded as stopped, and the output folder is finished as at a normal end."""
    out, child = tmp_path / "out", tmp_path / "child"
    runner = script(tmp_path, "call.py", f"""
        import sys
        from pathlib import Path
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / ".ci")!r}]
        from bench.processes import exit_on_signals
        from gpu_check import gpu_check
        exit_on_signals()
        out, work = Path({str(out)!r}), Path({str(tmp_path / "work")!r})
        out.mkdir(), work.mkdir()
        log = open(out / "check-7.log", "a")
        ctx = gpu_check.Context(call=7, device="cpu", rehearse=True, out=out, work=work,
                                rows=out / "check-7.rows.jsonl", python=sys.executable, fid_weights=None,
                                models=[], log=lambda line: (log.write(line + "\\n"), log.flush()))
        sleeps = [sys.executable, "-c", "import os, time; open({str(child)!r}, 'w').write(str(os.getpid())); "
                                        "time.sleep(60)"]
        steps = [gpu_check.Step("sleeps", lambda c, a: c.run("sleeps", sleeps, a), 50, 1)]
        gpu_check.run_call(7, steps, ctx, budget_s=60)
    """)
    process = subprocess.Popen(runner)
    try:
        pid = int(wait_for(child))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert not alive(pid)
    assert {f"check-7.{e}" for e in ("json", "log", "rows.jsonl", "tar.gz")} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "check-7.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("sleeps", "stopped")] and not summary["partial"]
    assert "sleeps: stopped" in (out / "check-7.log").read_text()


def test_the_graph_check_goes_on_after_a_model_that_fails_and_stops_at_one_that_hangs(tmp_path, monkeypatch):
    """Each model's graph check in one process; after a model raises (its CUDA state may be broken), a new process
    takes the models after it; a model still running at the limit gets a row saying so."""
    fake = tmp_path / "python"
    fake.write_text(f"""#!{PY}
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from bench.processes import append_rows
models = sys.argv[sys.argv.index("--models") + 1].split(",")
for model in models:
    if model == "hangs":
        time.sleep(60)
    error = "RuntimeError: capture failed" if model == "fails" else None
    append_rows([dict(model=model, what="graph check", captured=error is None, graph_status="graphed",
                      error=error)], "graphs")
    if error:
        sys.exit(3)
""")
    fake.chmod(0o755)
    ctx = _context(tmp_path, python=str(fake), models=["vae", "fails", "ncsn", "hangs", "iwae"])
    monkeypatch.setenv(gpu_check.GRAPH_FAIL_ENV, "")
    result = gpu_check._graphs_step(ctx, allowed=4.0)
    rows = {r["model"]: r for r in read_rows(ctx.rows)}
    assert result["processes"] == 2 and result["status"] == "timed out"
    assert result["captured"] == ["vae", "ncsn"] and set(result["errors"]) == {"fails", "hangs"}
    assert "timed out" in rows["hangs"]["error"] and result["not_reached"] == ["iwae"]


def test_the_pytest_step_stops_a_test_that_overruns_and_keeps_each_outcome(tmp_path, monkeypatch):
    """pytest-timeout stops a test past its limit (an `except Exception` in the test does not swallow it) and the run
    goes on; the JUnit XML gives each test's row. At the step's own limit pytest is interrupted (`timeout -s INT`):
    the tests before keep their rows, and the one it was in is named."""
    tests = tmp_path / "test_some.py"
    tests.write_text(textwrap.dedent("""
        import time
        import pytest

        def test_passes():
            pass

        def test_overruns():
            time.sleep(30)

        def test_overruns_inside_except_exception():
            try:
                time.sleep(30)
            except Exception:
                pass

        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass

        def test_fails():
            assert 1 == 2
    """))
    monkeypatch.setattr(gpu_check, "_cuda_test_files", lambda: [str(tests)])
    ctx = _context(tmp_path)
    start = time.monotonic()
    ended = gpu_check._pytest(ctx, "tests", [], per_test_s=1.0, allowed=60.0)
    assert time.monotonic() - start < 30 and ended["status"] == "failed"
    rows = {r["test"].split("::")[1]: r for r in read_rows(ctx.rows) if r["step"] == "tests"}
    assert {k: v["outcome"] for k, v in rows.items()} == {
        "test_passes": "passed", "test_overruns": "failed", "test_overruns_inside_except_exception": "failed",
        "test_skipped": "skipped", "test_fails": "failed"}
    assert "Timeout" in rows["test_overruns"]["message"] and "Timeout" in rows[
        "test_overruns_inside_except_exception"]["message"]
    assert rows["test_skipped"]["message"] == "not here" and "assert 1 == 2" in rows["test_fails"]["message"]
    assert ended["tests"] == {"passed": 1, "failed": 3, "skipped": 1}

    tests.write_text("import time\n\ndef test_first():\n    pass\n\ndef test_hangs():\n    time.sleep(60)\n")
    ended = gpu_check._pytest(ctx, "stopped", [], per_test_s=60.0, allowed=14.0)
    assert ended["status"] == "timed out" and ended["stopped_in"].endswith("::test_hangs"), ended
    outcomes = [(r["test"].split("::")[1], r["outcome"]) for r in read_rows(ctx.rows) if r["step"] == "stopped"]
    assert outcomes == [("test_first", "passed"), ("test_hangs", "stopped")]


def test_a_later_call_ends_what_a_killed_one_left(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    left = tmp_path / f"{harness.WORK_PREFIX}1-old"
    left.mkdir()
    env = {**os.environ, harness.WORK_ENV: str(left)}
    orphan = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not processes.processes_with_env(harness.WORK_ENV, str(left)) and time.monotonic() < deadline:
            time.sleep(0.05)
        notes = harness.clean_earlier_work(keep=tmp_path / "mine")
        assert orphan.wait(timeout=10) is not None
    finally:
        orphan.kill()
    assert not left.exists() and any("SIGTERM" in n for n in notes)


# ------------------------------------------------------------------------------------------------ whole calls

@pytest.mark.slow
@pytest.mark.parametrize("call", [1, 2])
def test_each_call_rehearsed_on_the_cpu(tmp_path, call):
    """`.ci/gpu-check N --rehearse`: every step of the call on the CPU, in its budget, its files in the folder."""
    start = time.monotonic()
    done = subprocess.run(["bash", ".ci/gpu-check", str(call), "--rehearse", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    budget = gpu_check.REHEARSAL_BUDGETS[call]
    assert elapsed < budget + 30, done.stdout[-3000:]
    assert {f"check-{call}.{ext}" for ext in ("json", "log", "rows.jsonl", "tar.gz")} <= {p.name for p in
                                                                                          tmp_path.iterdir()}
    summary = json.loads((tmp_path / f"check-{call}.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert steps["env"]["status"] == "ok"
    if call == 1:
        assert set(steps) == {"env", "cuda-tests", "graphs", "profile"}
        graphs = steps["graphs"]
        assert graphs["processes"] == 2 and set(graphs["errors"]) == {"iwae"}  # the injected failure, then on
        assert graphs["models"] == len(gpu_check.GRAPH_MODELS) and not graphs["not_reached"]
        assert steps["profile"]["status"] == "ok"
    else:
        assert steps["bench-all"]["benchmarks"]["train vae"] == "ok"
        pack = [r for r in summary["rows"] if r.get("benchmark") == "pack" and r["step"] != "pack-overrun"]
        assert pack and all(r["error"] is None for r in pack)
        overrun = steps["pack-overrun"]  # stopped at its limit with MPS up and 8 workers starting: nothing left
        assert overrun.get("stopped_at_limit") and overrun["rows_kept"] >= 1, overrun
        assert not overrun["group_left"] and not overrun["mps_left"] and any("SIGTERM" in n for n in overrun["mps"])
    assert not processes.processes_with_env("CUDA_MPS_PIPE_DIRECTORY", "/tmp/", prefix=True)
