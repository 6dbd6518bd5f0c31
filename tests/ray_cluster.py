"""A real multi-node Ray cluster on this machine, for tests: every node is its own `ray start --block` process.

As root (CI), all its processes (nodes and drivers) run in a private network namespace with only loopback up: Ray
can bind nothing but 127.0.0.1, nothing outside can reach it, and its ports cannot clash with other Ray instances
on the machine. Otherwise the nodes are pinned to 127.0.0.1 on free ports. Processes are stopped by PID, never by
name: a node's processes are the `ray start` process and its descendants (found through /proc), and, in the
namespace, every process inside it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def can_make_netns() -> bool:
    return (os.geteuid() == 0 and all(shutil.which(c) for c in ("unshare", "nsenter", "ip"))
            and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (which may hold spaces and parentheses): state, ppid, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """When the process started (clock ticks since boot): with the PID, names one process, even after PID reuse."""
    fields = _stat(pid)
    return fields[19] if fields else None


def descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every process below `pid`."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))):
            kids.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = {}, [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            if (started := start_time(child)) is not None:
                out[child] = started
            todo.append(child)
    return out


def kill(procs: dict[int, str], sig: int = signal.SIGKILL) -> None:
    """Signal each process that is still the one recorded (same PID and start time)."""
    for pid, started in procs.items():
        if start_time(pid) == started:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def wait_gone(procs: dict[int, str], timeout: float = 15) -> None:
    """Until every recorded process has exited (a killed process can still write files for a moment)."""
    def running(pid: int, started: str) -> bool:
        fields = _stat(pid)
        return fields is not None and fields[19] == started and fields[0] != "Z"  # a zombie has exited

    deadline = time.time() + timeout
    while any(running(pid, started) for pid, started in procs.items()) and time.time() < deadline:
        time.sleep(0.1)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


@dataclass
class Node:
    proc: subprocess.Popen
    log: Path
    head: bool
    node_id: str = ""
    procs: dict[int, str] = field(default_factory=dict)  # {pid: start time}: `ray start` and its descendants

    def refresh(self) -> None:
        if self.proc.poll() is None:
            self.procs.update({self.proc.pid: start_time(self.proc.pid), **descendants(self.proc.pid)})
        for pid in self.procs:
            raylet = [a for a in cmdline(pid) if a.startswith("--node_id=")]
            if raylet and Path(cmdline(pid)[0]).name == "raylet":
                self.node_id = raylet[0].split("=", 1)[1]


class LocalCluster:
    """Start with `start_head` and `add_worker`; run drivers with `popen`; always `shutdown` (a context manager)."""

    def __init__(self, env: dict[str, str] | None = None):
        # Short: Ray's Unix socket paths under the temp dir must stay below 108 characters.
        self.tmp = Path(tempfile.mkdtemp(prefix="gsray", dir="/tmp"))
        self.env = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
                    # One setting for head, workers and drivers; in a namespace only our own processes can connect.
                    "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        for var in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):  # the latter forbids `ray start --address`
            self.env.pop(var, None)
        self.nodes: list[Node] = []
        self.prefix: list[str] = []
        self.netns_holder: subprocess.Popen | None = None
        if can_make_netns():
            self.netns_holder = subprocess.Popen(
                ["unshare", "-n", "sh", "-c", "ip link set lo up && echo up && exec sleep 86400"],
                stdout=subprocess.PIPE, text=True)
            assert self.netns_holder.stdout.readline().strip() == "up", "could not set up a network namespace"
            self.netns = os.readlink(f"/proc/{self.netns_holder.pid}/ns/net")
            self.prefix = ["nsenter", f"--net=/proc/{self.netns_holder.pid}/ns/net", "--"]
        self.port = 6379 if self.netns_holder else free_port()
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def popen(self, args: list[str], log: Path, **kw) -> subprocess.Popen:
        """Run a command beside the cluster (same network namespace), output to `log`; its PID is the command's."""
        with open(log, "w") as f:
            return subprocess.Popen([*self.prefix, *args], cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    **kw)

    def _start(self, args: list[str], head: bool, timeout: float) -> Node:
        log = self.tmp / f"node{len(self.nodes)}.log"
        node = Node(self.popen([RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
                                *args], log), log, head)
        self.nodes.append(node)
        deadline = time.time() + timeout
        while "Ray runtime started" not in log.read_text():
            if node.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        while not node.node_id and time.time() < deadline:
            node.refresh()
            time.sleep(0.2)
        return node

    def start_head(self, num_cpus: int = 1, timeout: float = 90) -> Node:
        ports = [] if self.netns_holder else ["--dashboard-port", str(free_port())]
        return self._start(["--head", "--port", str(self.port), "--num-cpus", str(num_cpus), "--num-gpus", "0",
                            "--include-dashboard", "false", "--temp-dir", str(self.tmp / "ray"), *ports],
                           head=True, timeout=timeout)

    def add_worker(self, num_cpus: int = 1, timeout: float = 90) -> Node:
        return self._start(["--address", self.address, "--num-cpus", str(num_cpus), "--num-gpus", "0"],
                           head=False, timeout=timeout)

    def kill_node(self, node: Node) -> list[int]:
        """A machine failure: SIGKILL to every process of the node at once (raylet, agents, its trial workers)."""
        node.refresh()
        kill(node.procs)
        node.proc.wait(timeout=30)
        return sorted(node.procs)

    def session_dir(self) -> Path:
        return self.tmp / "ray" / "session_latest"

    def _namespace_procs(self) -> dict[int, str]:
        procs = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.netns_holder.pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/net") == self.netns:
                        procs[int(entry)] = start_time(int(entry))
                except OSError:
                    pass
        return procs

    def shutdown(self) -> None:
        """SIGTERM each node's `ray start` (it stops its processes), then SIGKILL whatever of ours is left."""
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                node.refresh()
                node.proc.send_signal(signal.SIGTERM)
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            kill(node.procs)
        leftovers = {pid: started for node in self.nodes for pid, started in node.procs.items()}
        if self.netns_holder:
            leftovers.update(self._namespace_procs())  # orphans, e.g. trial workers of a killed raylet, or a driver
            kill(leftovers)
            self.netns_holder.kill()
            self.netns_holder.wait()
        wait_gone(leftovers)
        shutil.rmtree(self.tmp, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_when(driver: subprocess.Popen, ready, timeout: float = 150, poll: float = 0.3) -> None:
    """SIGKILL `driver` (our own process, by PID) as soon as `ready()` holds: a driver dying with no chance to save
    anything more. Asserts that it was killed, not that it ended on its own first."""
    deadline = time.time() + timeout
    while driver.poll() is None and time.time() < deadline:
        if ready():
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(poll)
    assert driver.wait(timeout=30) == -signal.SIGKILL, f"the driver ended with {driver.returncode} before the kill"


def stored_results(storage: Path, name: str) -> dict[str, list[dict]]:
    """{trial_id: its reports in order} from the sweep's folder in storage."""
    results = {}
    for path in sorted((storage / name).glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            results[rows[0]["trial_id"]] = rows
    return results


def tune_state(storage: Path, name: str) -> dict[str, dict] | None:
    """The experiment state Tune saved to storage (what Tuner.restore will see): per trial its status, last epoch
    reported and the epoch of its latest checkpoint (0: none; None: deleted since, the saved state lags)."""
    from ray.tune import ExperimentAnalysis

    from genmodels.engine import CHECKPOINT_FILE
    from genmodels.io import load_checkpoint

    def checkpoint_epoch(trial) -> int | None:
        try:
            return load_checkpoint(Path(trial.checkpoint.path) / CHECKPOINT_FILE)["epoch"] if trial.checkpoint else 0
        except FileNotFoundError:
            return None

    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    try:
        trials = ExperimentAnalysis(str(storage / name)).trials
    except (ValueError, FileNotFoundError, json.JSONDecodeError):
        return None  # not written yet
    return {t.trial_id: {"status": t.status, "epoch": (t.last_result or {}).get("epoch", 0),
                         "checkpoint_epoch": checkpoint_epoch(t), "config": t.config} for t in trials}


def stop(proc) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()  # by PID: our own driver
        proc.wait()
