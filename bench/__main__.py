"""`python -m bench NAME ...`, from the repository's root:

    train | pack | flops | fid | sampling | profile   one benchmark (bench/suite.py)
    trial                                            a whole trial's wall time by phase (bench/trial.py)
    all                                              all of them inside one time budget (bench/run_all.py)
    overhead                                         Tune's overhead on one trial, or a sweep's busy slots
                                                     (bench/overhead.py)
    scale                                            the driver's cost per trial from 8 trials to thousands
                                                     (bench/scale.py)
    forecast                                         the dry run's forecast and the time left against a real
                                                     sweep (bench/forecast.py)

`python -m bench NAME --help` lists a subcommand's flags. The GPU check that runs them on a GPU machine is
.ci/gpu_check/ (`bash .ci/gpu-check 1|2`)."""
import sys

from bench import SUBCOMMANDS, module
from bench.processes import exit_on_signals


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    exit_on_signals()  # stopped with SIGTERM (a step's limit), a benchmark still runs its `finally` blocks
    module(argv[0]).main(argv[1:] if argv[0] in SUBCOMMANDS else argv)


main(sys.argv[1:])
