"""`python -m genmodels.bench NAME ...`: one benchmark (genmodels/bench/suite.py), a whole trial by phase (`trial`,
genmodels/bench/trial.py), or `all` of them inside one time budget (genmodels/bench/run_all.py). The GPU check that
runs them on a GPU machine is genmodels/bench/gpu_check.py (`bash .ci/gpu-check 1|2`)."""
import sys

from genmodels.bench.harness import exit_on_signals

exit_on_signals()  # stopped with SIGTERM (a step's limit), a benchmark still runs its `finally` blocks
if sys.argv[1:2] == ["all"]:
    from genmodels.bench.run_all import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["trial"]:
    from genmodels.bench.trial import main

    main(sys.argv[2:])
else:
    from genmodels.bench.suite import main

    main()
