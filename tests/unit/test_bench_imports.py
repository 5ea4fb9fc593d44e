"""The benchmarks stand on the package alone: `bench/` never imports `tests/`."""

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_does_not_import_tests() -> None:
    offending = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offending += [
                f"{path.name}: {n}" for n in names if n.split(".")[0] == "tests"
            ]
    assert offending == []
