"""The whole mission, as `synapse-relay demo` runs it: A -> R -> B while B, then A,
is offline, on SQLite and on PostgreSQL."""

import io
import subprocess
import sys
from pathlib import Path

import pytest

from synapse_relay.demo import Scenario, run
from tests.harness.postgres import Backend

pytestmark = pytest.mark.integration


def test_messages_cross_while_recipient_then_sender_offline(
    backend: Backend, tmp_path: Path
) -> None:
    scenario = Scenario(tmp_path / "demo", backend)
    out = io.StringIO()
    try:
        run(scenario, messages=5, keep=False, out=out)
        # every message once, in order, and nothing left on the relay
        assert scenario.bob.texts(scenario.room_id) == scenario.sent
        assert len(scenario.sent) == 5
        assert scenario.queued_for_b() == 0
        assert not scenario.a.is_running
    finally:
        scenario.stop_all()
    text = out.getvalue()
    assert "5/5 messages crossed" in text
    assert text.count("deposited on R") == 5


def test_demo_command(tmp_path: Path) -> None:
    """The newcomer's first command, as a process; it cleans up after itself."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "synapse_relay.cli",
            "demo",
            "--messages",
            "2",
            "--dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2/2 messages crossed" in result.stdout
    assert "[6/6] Summary" in result.stdout
    running = subprocess.run(
        ["pgrep", "-f", str(tmp_path / "demo")], capture_output=True, text=True
    )
    assert running.stdout == "", "the demo left homeservers running"


def test_demo_command_refuses_bad_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "synapse_relay.cli", "demo", "--messages", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--messages must be at least 1" in result.stderr
