"""`python -m genmodels.bench NAME ...`: one benchmark (genmodels/bench/suite.py), or `all` of them inside one time
budget (genmodels/bench/run_all.py)."""
import sys

if sys.argv[1:2] == ["all"]:
    from genmodels.bench.run_all import main

    main(sys.argv[2:])
else:
    from genmodels.bench.suite import main

    main()
