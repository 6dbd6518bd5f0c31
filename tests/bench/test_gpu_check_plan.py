"""What the GPU check's calls run, and in what order (.ci/gpu_check/README.md): call 1 is what turning CUDA graphs on
by default waits for, NCSN's graphs first; the cold compiles are call 2's; the check turns graphs on wherever it
trains or benchmarks with them (graphs_on.py), since they are off by default."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / ".ci"))  # the GPU check's modules: package gpu_check, as .ci/gpu-check runs them
from gpu_check import gpu_check, graphs_on  # noqa: E402

from bench.common import BENCH_MODELS  # noqa: E402
from genmodels.config import TrainConfig  # noqa: E402


def test_call_one_checks_ncsns_graphs_first_and_leaves_the_compiles_to_call_two():
    assert gpu_check.GRAPH_MODELS[:2] == ("ncsn", "ncsn_refinenet")
    assert sorted(gpu_check.GRAPH_MODELS) == sorted(BENCH_MODELS)
    for rehearse in (False, True):
        one = [s.name for s in gpu_check.plan(1, rehearse)]
        two = [s.name for s in gpu_check.plan(2, rehearse)]
        assert one == ["env", "cuda-tests", "graphs", "profile"]
        assert two[:3] == ["env", "compile-tests", "bench-all"]
    # each call's steps' least times fit its budget, with the time kept back for its end
    for call, budget in gpu_check.BUDGETS.items():
        assert sum(s.min_s for s in gpu_check.plan(call, False)) + gpu_check.FINISH_S <= budget


def test_call_one_runs_the_norms_cuda_tests_and_no_compile():
    """The CUDA + bf16 comparisons of the custom norms are in call 1's selection (-m "not slow" -k "not compile");
    here on the CPU pytest collects them and skips them at run time."""
    files = gpu_check._cuda_test_files()
    assert "tests/genmodels/test_score_networks.py" in files and "tests/genmodels/test_cuda_graphs.py" in files
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-m", "not slow", "-k", "not compile", *files], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    collected = done.stdout.splitlines()
    for test in ("test_group_norm_silu_matches_group_norm_under_bf16_autocast",
                 "test_cond_instance_norm_plus_matches_the_reference_formula_under_bf16_autocast"):
        assert any(f"{test}[" in line and "cuda" in line for line in collected), done.stdout[-2000:]
    assert not any("compile" in line.split("::")[-1] for line in collected if "::" in line)


def test_benchmarks_under_graphs_on_default_to_cuda_graphs_but_keep_a_setting_of_their_own(tmp_path):
    assert graphs_on.command_with_graphs_on([sys.executable, "-m", "bench", "train", "--models", "vae"]) == [
        sys.executable, "-m", "gpu_check.graphs_on", "bench", "train", "--models", "vae"]
    assert graphs_on.command_with_graphs_on(["nvidia-smi"]) == ["nvidia-smi"]
    assert TrainConfig().cuda_graphs is False  # the library's default, until a GPU check shows graphs sound
    (tmp_path / "shows.py").write_text(
        "import sys\nfrom genmodels.config import TrainConfig\nfrom genmodels.registry import trial_config\n"
        "print(TrainConfig().cuda_graphs, TrainConfig(cuda_graphs=False).cuda_graphs,\n"
        "      trial_config({'batch_size': 8}, 'vae').train.cuda_graphs,\n"
        "      trial_config({'train.cuda_graphs': False}, 'vae').train.cuda_graphs, sys.argv[1:])\n")
    path = f"{ROOT / '.ci'}:{ROOT}:{tmp_path}"
    done = subprocess.run([sys.executable, "-m", "gpu_check.graphs_on", "shows", "--flag", "x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"PYTHONPATH": path, "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "True False True False ['--flag', 'x']"


def test_bench_all_starts_each_benchmark_under_graphs_on():
    import types

    started = []
    run_all = types.SimpleNamespace(run_group=lambda command, *a, **k: started.append(command) or {"status": "ok"})
    with graphs_on.with_graphs_on(run_all):
        run_all.run_group([sys.executable, "-m", "bench", "pack", "--cuda-graphs", "on,off"], 10.0)
    run_all.run_group([sys.executable, "-m", "bench", "fid"], 10.0)
    assert started == [[sys.executable, "-m", "gpu_check.graphs_on", "bench", "pack", "--cuda-graphs", "on,off"],
                       [sys.executable, "-m", "bench", "fid"]]
