"""`python -m genmodels.bench NAME ...`: one benchmark (genmodels/bench/suite.py), a whole trial by phase (`trial`,
genmodels/bench/trial.py), or `all` of them inside one time budget (genmodels/bench/run_all.py)."""
import sys

if sys.argv[1:2] == ["all"]:
    from genmodels.bench.run_all import main

    main(sys.argv[2:])
elif sys.argv[1:2] == ["trial"]:
    from genmodels.bench.trial import main

    main(sys.argv[2:])
else:
    from genmodels.bench.suite import main

    main()
