"""`python -m bench`: see bench/runner.py and README.rst, "Benchmarks"."""

from bench.runner import main

raise SystemExit(main())
