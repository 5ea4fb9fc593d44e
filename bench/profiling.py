"""Optional py-spy profiles of the homeservers while a benchmark loads them
(`python -m bench --profile DIR`).

Each profile is py-spy's raw collapsed-stack output (one line per distinct stack,
`thread;frame;frame;... count`), which `top_frames` summarises and any flame-graph
tool (https://www.speedscope.app, `flamegraph.pl`) can draw. Sampling costs the
profiled process little (`--nonblocking`), but figures measured with profiles on
are not the reference ones.
"""

import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def profiled(
    directory: Path | None,
    pid: int | None,
    name: str,
    log: Callable[[str], None],
    wall: bool = False,
) -> Iterator[None]:
    """Record `pid` with py-spy into `directory/name.txt` while the block runs,
    then log its busiest frames. Does nothing when `directory` is None.

    By default only the thread holding the GIL is sampled (`--gil`): where the
    Python CPU time goes, across all threads. `wall`: every thread, idle ones
    included (`--idle`): where the time goes, waiting included."""
    if directory is None or pid is None:
        yield
        return
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        log("py-spy not found (pip install py-spy): not profiling")
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / f"{name}.txt"
    process = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--threads",
            *(["--idle"] if wall else ["--gil"]),
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if output.exists():
        log(f"profile {output}:")
        for line in top_frames(output):
            log("    " + line)


def _thread_kind(name: str) -> str:
    if name == "MainThread":
        return "reactor (main thread)"
    if name.startswith("PoolThread-twisted.internet.reactor"):
        return "reactor thread pool"
    if name.startswith("PoolThread-"):
        return "database thread"
    return "other threads"


def top_frames(path: Path, limit: int = 12) -> list[str]:
    """A summary of a raw py-spy profile: the share of samples of each kind of
    thread, then the main (reactor) thread's frames most often on the stack
    (inclusive, leaving out Twisted's and those on nearly every sample)
    and most often at the top of the stack (self time)."""
    kinds: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    main = 0
    main_waiting = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, *frames = stack.split(";")
        kind = _thread_kind(thread.split(": ", 1)[-1])
        kinds[kind] += count
        if kind.startswith("reactor (") and frames:
            main += count
            leaves[frames[-1]] += count
            # Synapse wraps the reactor's epoll call (synapse/metrics/
            # _reactor_metrics.py): that leaf is the reactor waiting
            if "doPoll" in frames[-1] or "_reactor_metrics" in frames[-1]:
                main_waiting += count
            for frame in set(frames):
                inclusive[frame] += count
    total = sum(kinds.values())
    if total == 0 or main == 0:
        return ["(no samples)"]
    lines = [
        f"{total} samples (busy threads only): "
        + ", ".join(f"{kind} {100 * n / total:.0f}%" for kind, n in kinds.most_common())
    ]
    lines.append(
        f"main thread: {main} samples, {100 * main_waiting / main:.0f}% waiting"
        " for I/O or timers (epoll; sampled with --idle only)"
    )
    lines.append("main thread, inclusive (Twisted's own frames left out):")
    shown = [
        (f, n)
        for f, n in inclusive.most_common()
        if n < 0.9 * main and "twisted/" not in f
    ][:limit]
    lines.extend(f"  {100 * n / main:5.1f}%  {frame}" for frame, n in shown)
    lines.append("main thread, self:")
    lines.extend(
        f"  {100 * n / main:5.1f}%  {frame}" for frame, n in leaves.most_common(limit)
    )
    return lines
