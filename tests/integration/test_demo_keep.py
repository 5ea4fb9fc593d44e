"""`synapse-relay demo` as a process: with `--keep --postgres` it names each
process it leaves running (A, R, B and PostgreSQL, all under --dir), and the
commands it prints stop and restart each of them; with `--workers` (R a worker
deployment with Redis) the message crosses and nothing is left running."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from synapse_relay.loopback import PostgresCluster, wait_until
from synapse_relay.loopback_workers import RedisServer
from tests.conftest import require

pytestmark = pytest.mark.integration

# What the demo prints for each process it keeps running, in this order.
PROCESSES = ["A", "R", "B", "PostgreSQL"]


def kept(output: str) -> dict[str, dict[str, str]]:
    """process -> {"stop": ..., "restart": ..., "url": ...} from the demo's output."""
    found: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in output.splitlines():
        name = line.split("  ", 1)[0]
        if name in PROCESSES:
            current = found.setdefault(name, {})
        elif match := re.match(r"\s+(stop|restart):\s+(.*)", line):
            current[match[1]] = match[2]
        elif match := re.match(r"\s+client API (\S+)", line):
            current["url"] = match[1]
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def processes_under(directory: Path) -> list[str]:
    """The command lines of running processes that name `directory`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(directory) in text and alive(int(cmdline.parent.name)):
            found.append(text)
    return found


def healthy(base_url: str) -> bool:
    try:
        return requests.get(base_url + "/health", verify=False, timeout=5).ok
    except requests.RequestException:
        return False


def shell(command: str) -> None:
    subprocess.run(command, shell=True, check=True, timeout=120)


def pid_of(directory: Path, name: str) -> int:
    return int((directory / name / "homeserver.pid").read_text())


def stop_homeserver(directory: Path, name: str, command: str) -> None:
    pid = pid_of(directory, name)
    shell(command)
    wait_until(lambda: not alive(pid), 60, message=f"{name} stopped")


@pytest.fixture
def directory() -> Iterator[Path]:
    """The demo's --dir, open to the postgres user when we run as root (pytest's
    own temporary directories are not); whatever the demo left running there is
    stopped after, and it is removed."""
    directory = Path(tempfile.mkdtemp(prefix="synapse-relay-test-demo-"))
    directory.chmod(0o755)
    yield directory
    for pid_file in directory.glob("*/homeserver.pid"):
        stop(int(pid_file.read_text()), signal.SIGTERM)
    postmaster = directory / "postgres" / "data" / "postmaster.pid"
    if postmaster.exists():  # its first line is the server's pid
        stop(int(postmaster.read_text().split()[0]), signal.SIGINT)  # fast shutdown
        wait_until(lambda: not postmaster.exists(), 60, message="PostgreSQL stopped")
    shutil.rmtree(directory, ignore_errors=True)


def stop(pid: int, signum: int) -> None:
    if alive(pid):
        os.kill(pid, signum)


def demo(directory: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """`synapse-relay demo --messages 1 --dir directory options...`, run."""
    return subprocess.run(
        [
            sys.executable,
            *("-m", "synapse_relay.cli", "demo", "--messages", "1"),
            *("--dir", str(directory), *options),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_demo_keep_reports_what_it_leaves_running(directory: Path) -> None:
    if not PostgresCluster.available():
        pytest.skip("PostgreSQL binaries not found: apt-get install postgresql")
    result = demo(directory, "--keep", "--postgres")
    assert result.returncode == 0, result.stdout + result.stderr
    processes = kept(result.stdout)
    assert list(processes) == PROCESSES, result.stdout
    for name, commands in processes.items():
        assert {"stop", "restart"} <= commands.keys(), (name, result.stdout)
    assert f"data in {directory}/postgres/data" in result.stdout
    # everything it left running is under --dir
    assert len(processes_under(directory)) >= 4

    # B stops and restarts with the printed commands
    stop_homeserver(directory, "B", processes["B"]["stop"])
    shell(processes["B"]["restart"])
    wait_until(lambda: healthy(processes["B"]["url"]), 60, message="B restarted")

    # and everything stops with the printed commands, PostgreSQL last
    for name in ("A", "R", "B"):
        stop_homeserver(directory, name, processes[name]["stop"])
    shell(processes["PostgreSQL"]["stop"])
    wait_until(
        lambda: processes_under(directory) == [], 60, message="nothing left running"
    )


@pytest.mark.workers
def test_demo_with_a_relay_on_workers(directory: Path) -> None:
    """R runs as a main process, four workers and Redis: the message crosses, the
    output says which process accepted the deposit, and everything stops."""
    require(
        PostgresCluster.available() and RedisServer.available(),
        "--workers needs PostgreSQL and redis-server:"
        " apt-get install postgresql redis-server",
    )
    result = demo(directory, "--workers")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "1/1 messages crossed from alice to bob through R" in output
    assert re.search(r"\n +federation1 +deposits accepted: [1-9]", output), output
    assert (directory / "R" / "federation1.log").exists()
    assert processes_under(directory) == []
