"""`python -m bench forecast -- RUN_FLAGS`: the dry run's forecast against the real sweep, and the progress
output's time left against the real remaining time:

    python -m bench forecast --json a.json -- --space vae --preset smoke
    python -m bench forecast --json b.json -- --space ncsn --preset smoke

It runs `sweeps/run.py RUN_FLAGS --dry-run` (timed), then the sweep itself (timed, under its own --storage-path),
and replays the time left the progress line would have said when a quarter and half of the trials had ended,
from the trials' own report times (result.json's timestamps), against the sweep's actual end; and each time left the
sweep printed as it ran, against the actual end from the moment the line came. Prints one table.

    python -m bench forecast --replay A B C ...

replays the time left of sweeps kept earlier (each --keep folder) through this checkout's estimator, with no
sweep run: a change to the time left is measured on the same sweeps as the code before it. Over many sweeps it also
sets the trial-epochs the estimator expected still to train at each point against those trained: its model of
ASHA's cuts is calibrated when the two sums agree, whatever one sweep's draw.
"""
from __future__ import annotations

import argparse
import bisect
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import format_table, write_json


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench forecast", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--keep", help="run the sweep under this --storage-path and keep it (default: a temporary one)")
    p.add_argument("--replay", nargs="+", metavar="KEPT", help="instead of a run: the time left of sweeps kept "
                   "earlier with --keep, replayed through this checkout")
    p.add_argument("--slots", type=int, help="with --replay: the trials the kept sweeps ran at once (default: what "
                   "each one's dry run said, kept as dry-run.txt)")
    p.add_argument("run", nargs=argparse.REMAINDER, help="-- then the flags of sweeps/run.py")
    return p


def seconds(text: str) -> float:
    """'1 h 05 min' | '4 min 10 s' | '12 s' | '3.5 s' -> seconds."""
    if m := re.fullmatch(r"(\d+) h (\d+) min", text):
        return int(m[1]) * 3600 + int(m[2]) * 60
    if m := re.fullmatch(r"(\d+) min (\d+) s", text):
        return int(m[1]) * 60 + int(m[2])
    return float(text.removesuffix(" s"))


def replayed_time_left(folder: Path, spec, slots: int, end: float) -> list[dict]:
    """What the progress line said was left when a quarter and half of the trials had ended: the trials' reports
    passed through the driver's tally (sweeps/progress.py) in the order they were made (`reported_at`), against
    the real time left then (`end`: the sweep's end, sweep_end)."""
    from sweeps.progress import Tally

    reports = []
    for path in folder.glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        reports += [(r["reported_at"], path.parent.name, r, i == len(rows) - 1) for i, r in enumerate(rows)]
    reports.sort(key=lambda r: r[0])
    trained = sum(r["epoch"] for _, _, r, last in reports if last)  # each trial's last epoch, summed
    out = []
    for share in (0.25, 0.5):
        tally = Tally()
        tally.begin(spec, slots)
        for stamp, trial, result, last in reports:
            tally.record(trial, result, now=stamp)
            if last:
                tally.ended.add(trial)
            if len(tally.ended) >= share * spec.num_samples:
                said, actual = tally.left(now=stamp), end - stamp
                outcomes = outcomes_left(tally, stamp)
                out.append({"share": share, "at": f"{len(tally.ended)}/{spec.num_samples} ended", "said_s": said,
                            "actual_s": actual, "error_%": 100 * (said - actual) / max(actual, 1e-9),
                            "p10_s": outcomes[len(outcomes) // 10], "p90_s": outcomes[len(outcomes) * 9 // 10],
                            "actual_pct": 100 * bisect.bisect(outcomes, actual) / len(outcomes),
                            "best_hit_%": 100 * best_hit(outcomes),
                            "epochs_left": tally.epochs_left(),
                            "epochs_trained_after": trained - sum(tally.epochs.values())})
                break
    return out


def outcomes_left(tally, now: float, sweeps: int = 2000) -> list[float]:
    """The time left in each of `sweeps` sweeps simulated from the tally's state at `now` by the estimator's own
    model (Tally.outcomes_left: ASHA on values drawn where not known, each trial at the cost the reports show, then
    the sweep's end), sorted: how far the outcome itself may fall from any one number said then."""
    return sorted(tally.outcomes_left(now, sweeps))


def best_hit(outcomes: list[float], within: float = 0.3) -> float:
    """The largest share of `outcomes` (sorted) that any one number is within +-`within` of: the best a time left
    said then could do against this spread, however it were computed."""
    best, low = 0, 0
    for high, x in enumerate(outcomes):  # a number e is within of x where x * (1 - within) <= e <= x * (1 + within)
        while outcomes[low] * (1 + within) < x * (1 - within):
            low += 1
        best = max(best, high - low + 1)
    return best / len(outcomes)


def sweep_end(folder: Path) -> float:
    """When the sweep ended, for the time left: when its driver wrote driver.json, once Ray had stopped and just
    before it printed the results (sweeps/driver.py). A sweep kept without one: its last report."""
    record = folder / "driver.json"
    if record.is_file():
        return record.stat().st_mtime
    return max(json.loads(line)["reported_at"] for p in folder.glob("*/result.json")
               for line in p.read_text().splitlines() if line.strip())


PROGRESS_LINE = re.compile(r"^gensweep: .* elapsed, (\d+) of (\d+) trials ended; about (.+?) left")


def timed_lines(command: list[str]) -> tuple[list[tuple[float, str]], int, str]:
    """Run `command`, each line of its output with the moment (time.time()) it came: its lines, exit code and
    standard error."""
    with tempfile.TemporaryFile("w+") as err:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1) as proc:
            lines = [(time.time(), line) for line in proc.stdout]
        err.seek(0)
        return lines, proc.returncode, err.read()


def printed_time_left(lines: list[tuple[float, str]], end: float) -> list[dict]:
    """Each time left the sweep printed while it ran (the progress line, with a table or alone), against the real
    time left then (`end`: the sweep's end, sweep_end)."""
    out = []
    for at, line in lines:
        if m := PROGRESS_LINE.match(line):
            said, actual = seconds(m[3]), end - at
            out.append({"at": f"{m[1]}/{m[2]} ended", "said_s": said, "actual_s": actual,
                        "error_%": 100 * (said - actual) / max(actual, 1e-9)})
    return out


FORECAST_LINE = re.compile(r"wall time about (.+?) \((.+?)-(.+?)\) on (\d+) slot")


def replay(kept: list[str], slots: int | None) -> list[dict]:
    """The time left of each kept sweep at a quarter and half of its trials, as this checkout says it."""
    from sweeps.spec import SweepSpec

    rows = []
    for path in kept:
        spec = SweepSpec.load(path, "forecast")
        folder = Path(path, "forecast")
        dry = Path(path, "dry-run.txt")
        if slots is None and not dry.is_file():
            sys.exit(f"{path} has no dry-run.txt (kept before it was): pass --slots N")
        at_once = slots or int(FORECAST_LINE.search(dry.read_text())[4])
        rows += [{"sweep": path, **e} for e in replayed_time_left(folder, spec, at_once, sweep_end(folder))]
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.replay:
        rows = replay(args.replay, args.slots)
        print(format_table(rows))
        for share, name in ((0.25, "a quarter"), (0.5, "half")):
            at = [r for r in rows if r["share"] == share]
            errors = [r["error_%"] for r in at]
            print(f"at {name}: within +-30% in {sum(abs(e) <= 30 for e in errors)} of {len(errors)}, median "
                  f"|error| {statistics.median(map(abs, errors)):.0f}%, mean {statistics.mean(errors):+.0f}%; "
                  f"trial-epochs left, the estimator's expectation over all {sum(r['epochs_left'] for r in at):.1f}, "
                  f"trained {sum(r['epochs_trained_after'] for r in at)}")
        report = {"benchmark": "forecast-replay", "rows": rows}
        write_json(args.json, report)
        return report
    run = [a for a in args.run if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.keep or tmp
        storage = ["--storage-path", tmp, "--name", "forecast"]
        start = time.perf_counter()
        dry = subprocess.run([sys.executable, "sweeps/run.py", *run, *storage, "--dry-run"], capture_output=True,
                             text=True, check=True).stdout
        dry_s = time.perf_counter() - start
        said = FORECAST_LINE.search(dry)
        start = time.perf_counter()
        lines, code, err = timed_lines([sys.executable, "sweeps/run.py", *run, *storage])
        wall_s = time.perf_counter() - start
        if code:
            sys.exit(f"the sweep failed (exit {code}): {err[-2000:]}")
        Path(tmp, "dry-run.txt").write_text(dry)  # for --replay
        Path(tmp, "sweep-output.txt").write_text("".join(f"{at:.3f} {line}" for at, line in lines))
        from sweeps.spec import SweepSpec

        spec = SweepSpec.load(tmp, "forecast")
        folder = Path(tmp, "forecast")
        end = sweep_end(folder)
        said_left = (("time left at", replayed_time_left(folder, spec, int(said[4]), end)),
                     ("printed at", printed_time_left(lines, end)))
        epochs = sum(len(p.read_text().splitlines()) for p in folder.glob("*/result.json"))
    forecast = seconds(said[1])
    rows = [{"what": "wall time", "forecast_s": forecast, "range": f"{said[2]}-{said[3]}", "actual_s": wall_s,
             "error_%": 100 * (forecast - wall_s) / wall_s},
            {"what": "trial-epochs", "forecast_s": float(re.search(r"([\d.]+) trial-epochs", dry)[1]), "range": "",
             "actual_s": float(epochs), "error_%": None},
            {"what": "dry run itself", "forecast_s": None, "range": "", "actual_s": dry_s, "error_%": None},
            *({"what": f"{how} {e['at']}", "forecast_s": e["said_s"], "range": "", "actual_s": e["actual_s"],
               "error_%": e["error_%"]} for how, left in said_left for e in left)]
    print(f"forecast: sweeps/run.py {' '.join(run)}")
    print(format_table(rows))
    report = {"benchmark": "forecast", "run": run, "rows": rows, "dry_run": dry}
    write_json(args.json, report)
    return report
