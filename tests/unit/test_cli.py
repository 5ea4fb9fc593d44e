"""The `synapse-relay` command's usage (the demo itself runs in
tests/integration/test_end_to_end.py and test_demo_keep.py)."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from synapse_relay import cli
from synapse_relay.loopback import PostgresCluster
from synapse_relay.loopback_workers import RedisServer


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `synapse-relay args...`, in this process."""
    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse: --help, --version, usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_no_command_says_what_to_run() -> None:
    """As a process, through the console script's module."""
    result = subprocess.run(
        [sys.executable, "-m", "synapse_relay.cli"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "usage: synapse-relay" in result.stderr
    assert "a command is needed, e.g. `synapse-relay demo`" in result.stderr
    assert "args" not in result.stderr  # no internal name leaks


def test_version_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"synapse-relay {version('synapse-relay')}"


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "demo" in out
    assert "--version" in out


def test_unknown_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "dmeo")
    assert code == 2
    assert "invalid choice: 'dmeo' (choose from 'demo')" in err


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0
    assert out.startswith("usage: synapse-relay demo")
    for option in ("--messages", "--postgres", "--workers", "--keep", "--dir"):
        assert option in out


def test_demo_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "demo", "--messages", "0")
    assert code == 2
    assert "synapse-relay demo: error: --messages must be at least 1" in err


@pytest.mark.parametrize(
    "options, missing, error",
    [
        (
            ["--workers"],
            RedisServer,
            "--workers needs Redis (on Debian: apt-get install redis-server)",
        ),
        (
            ["--workers"],
            PostgresCluster,
            "--workers needs PostgreSQL installed (on Debian: apt-get install"
            " postgresql)",
        ),
        (
            ["--postgres"],
            PostgresCluster,
            "--postgres needs PostgreSQL installed (on Debian: apt-get install"
            " postgresql)",
        ),
    ],
)
def test_demo_says_which_package_is_missing(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    options: list[str],
    missing: type,
    error: str,
) -> None:
    """--workers needs PostgreSQL (it implies --postgres) and Redis: without either,
    one line naming the Debian package, exit code 1, nothing started or created."""
    monkeypatch.setattr(missing, "available", staticmethod(lambda: False))
    directory = tmp_path / "demo"
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", *options, "--dir", str(directory)])
    assert exited.value.code == error  # printed to stderr, exit code 1
    assert not directory.exists()
