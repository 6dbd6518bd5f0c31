"""`python -m genmodels.bench ...`: the benchmark suite's command line (see genmodels/bench/suite.py)."""
from genmodels.bench.suite import main

main()
