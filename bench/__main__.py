"""`python -m bench`: see bench/runner.py and docs/benchmarks.rst."""

from bench.runner import main

raise SystemExit(main())
