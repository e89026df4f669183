"""A SIGTERM to a process that started children with `kvpilot.procs` stops those children too
(a benchmark killed by `timeout` or `kill` used to leave its workers and router running)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvpilot.procs import pid_alive, wait_for

pytestmark = pytest.mark.integration

PARENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kvpilot.procs import ManagedProcess
    child = ManagedProcess("sleeper", ["sleep", "120"], Path(sys.argv[1]) / "sleeper.log")
    print(child.pid, flush=True)
    time.sleep(120)
""")


def test_sigterm_to_the_parent_stops_its_children(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-P", "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert pid_alive(child)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=20) == 128 + signal.SIGTERM
        wait_for(lambda: not pid_alive(child), 10, "the child to stop with its parent")
    finally:
        parent.kill()
        parent.wait()
