"""`python -m bench`: run the benchmarks, print the table, write the JSON.

Every figure starts its own real homeservers on loopback (and one throwaway
PostgreSQL server is shared by the figures that need it); all are stopped when
the figure ends, also on Ctrl-C or SIGTERM. Progress goes to stderr, the table to
stdout.
"""

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import synapse

from bench import backlog, delivery, deposit, fallback, report
from bench.common import BenchError, Context, Options
from synapse_relay.loopback import (
    HomeserverError,
    PostgresCluster,
    make_self_signed_cert,
    terminated_as_interrupt,
)

FIGURES: dict[str, tuple[str, Callable[[Context], dict[str, Any]]]] = {
    "1": ("fallback latency", fallback.run),
    "2": ("deposit throughput", deposit.run),
    "3": ("relayed versus direct delivery", delivery.run),
    "4": ("backlog scaling", backlog.run),
}
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def smoke_options(options: Options) -> Options:
    """Tiny sizes that exercise every code path in well under two minutes."""
    options.smoke = True
    options.fallback_messages = 3
    options.attempts_before_relay = 1
    options.messages = 20
    options.duration = 1.0
    options.warmup = 0.5
    options.concurrency = 8
    options.rounds = 1
    options.backlog = 2000
    options.backlog_destinations = 10
    options.collect_entries = 50
    return options


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of synapse-relay on real homeservers on loopback:"
        " each figure a ratio against a baseline measured in the same run.",
    )
    defaults = Options()
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, for CI (about a minute)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="N",
        help="run only figure N (1-4); repeat or separate with commas",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="PATH",
        help=f"where to write the results as JSON (default {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--messages",
        type=int,
        metavar="K",
        help=f"figure 3: messages (transactions) A sends (default {defaults.messages})",
    )
    parser.add_argument(
        "--fallback-messages",
        type=int,
        metavar="N",
        help=f"figure 1: messages per case (default {defaults.fallback_messages})",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        metavar="N",
        help=f"figure 4: entries queued for other destinations (default"
        f" {defaults.backlog:,})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help=f"figures 2 and 4: seconds of each load (default {defaults.duration:g})",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="C",
        help=f"figures 2 and 4: requests in flight (default {defaults.concurrency})",
    )
    parser.add_argument(
        "--backends",
        metavar="LIST",
        help="figures 2 and 4: comma-separated database backends"
        f" (default {','.join(defaults.backends)})",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the homeservers under load with py-spy into DIR (slows them"
        " down: not for reference figures)",
    )
    parser.add_argument(
        "--dir", type=Path, help="where to put the homeservers (default: a temp dir)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the homeservers' directory"
    )
    args = parser.parse_args(argv)
    figures: list[str] = []
    for item in args.only or []:
        figures.extend(part.strip() for part in item.split(",") if part.strip())
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {', '.join(unknown)}: choose from 1, 2, 3, 4")
    args.figures = [f for f in FIGURES if not figures or f in figures]
    return args


def build_options(args: argparse.Namespace) -> Options:
    options = smoke_options(Options()) if args.smoke else Options()
    for name in ("messages", "fallback_messages", "backlog", "duration", "concurrency"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                raise SystemExit(f"--{name.replace('_', '-')} must be positive")
            setattr(options, name, value)
    if args.backends:
        backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
        if not backends or set(backends) - {"sqlite", "postgres"}:
            raise SystemExit("--backends takes sqlite, postgres or both")
        options.backends = backends
    options.profile_dir = args.profile
    return options


def module_fingerprint() -> str:
    """A digest of the module's source: the homeservers load it from the
    checkout when they start, so a change during a run makes figures compare
    different code."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent.parent / "synapse_relay"
    for path in sorted(package.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def checkout() -> dict[str, Any]:
    """The commit and the files changed since, if this runs from a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        result = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False
        )
        return result.stdout.rstrip() if result.returncode == 0 else ""

    changed = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "changed": [line[3:] for line in changed.splitlines()],
        "module_fingerprint": module_fingerprint(),
    }


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "synapse": synapse.__version__,
        "postgres": str(PostgresCluster.bindir()),
    }


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = build_options(args)
    root = args.dir or Path(tempfile.mkdtemp(prefix="synapse-relay-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    cluster: PostgresCluster | None = None

    def postgres() -> PostgresCluster:
        nonlocal cluster
        if cluster is None:
            if not PostgresCluster.available():
                raise BenchError(
                    "PostgreSQL is not installed (apt-get install postgresql);"
                    " or run with --backends sqlite"
                )
            started = PostgresCluster()
            started.start()
            cluster = started
        return cluster

    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    # other processes on the machine skew the figures: say how busy it was
    load: dict[str, list[float]] = {}
    failed = False
    began = time.monotonic()
    code = checkout()
    code["changed_during"] = []
    log(f"synapse-relay benchmarks in {root}: figures {', '.join(args.figures)}")
    try:
        with terminated_as_interrupt():
            ctx = Context(
                options=options,
                root=root,
                cert=make_self_signed_cert(root / "tls"),
                postgres=postgres,
                log=log,
            )
            for figure in args.figures:
                name, run = FIGURES[figure]
                log(f"--- figure {figure}: {name}")
                started = time.monotonic()
                load[figure] = [round(os.getloadavg()[0], 2)]
                fingerprint = module_fingerprint()
                try:
                    results[figure] = run(ctx)
                except (BenchError, HomeserverError, OSError, ValueError) as e:
                    failed = True
                    results[figure] = {"error": f"{type(e).__name__}: {e}"}
                    log(traceback.format_exc())
                    log(f"figure {figure} failed; logs are in {root}")
                seconds[figure] = round(time.monotonic() - started, 1)
                if module_fingerprint() != fingerprint:
                    code["changed_during"].append(figure)
                    log(
                        f"WARNING: synapse_relay/ changed during figure {figure}:"
                        " its homeservers may have run different code"
                    )
                load[figure].append(round(os.getloadavg()[0], 2))
                log(f"--- figure {figure} took {seconds[figure]:.0f} s")
    except KeyboardInterrupt:
        log("interrupted: every server was stopped")
        return 130
    finally:
        if cluster is not None:
            cluster.stop()
        if not (args.keep or args.dir or failed):
            shutil.rmtree(root, ignore_errors=True)

    total = time.monotonic() - began
    table = report.markdown(results)
    print(table)
    document = {
        "command": "python -m bench "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "checkout": code,
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(options).items()
        },
        "seconds": {**seconds, "total": round(total, 1)},
        "load_average_before_after": load,
        "results": results,
        "table": table,
    }
    report.write_json(args.json, document)
    log(f"results written to {args.json}; {total:.0f} s in all")
    return 1 if failed else 0
