"""Benchmarks of synapse-relay on real homeservers on loopback (`python -m bench`).

Four figures, each a module, each reported as a ratio against a baseline measured
in the same run: `fallback` (1), `deposit` (2), `delivery` (3), `backlog` (4,
seeded by `seed`). `runner` runs them, `report` prints the table and writes the
JSON, `common` holds the load generator and signed sessions, `profiling` the
optional py-spy recordings.
"""
