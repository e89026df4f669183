"""`kvpilot bench` finds the recorded benchmarks and runs one with its own arguments."""

from __future__ import annotations

import subprocess
import sys

KVPILOT = [sys.executable, "-P", "-m", "kvpilot.cli", "bench"]


def test_lists_benchmarks_and_passes_arguments_through() -> None:
    listing = subprocess.run(KVPILOT, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "autoscale" in listing.stdout and "routing-quality" in listing.stdout
    helped = subprocess.run([*KVPILOT, "autoscale", "--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "--workload" in helped.stdout
    unknown = subprocess.run([*KVPILOT, "no-such-bench"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "unknown benchmark" in unknown.stderr
