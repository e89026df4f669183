"""`kvpilot sim calibrate` recovers a known engine: the simulator's own real-time server.

The simulated worker sleeps for exactly its profile's step times, so the fitted profile must land
near the one it runs (within scheduling jitter), and the file it writes loads as a profile.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kvpilot.sim.profiles import get_profile
from kvpilot.testing.sim import SimWorker


def test_calibrate_fits_the_profile_the_simulator_runs(sim_worker_factory: Callable[..., SimWorker],
                                                       tmp_path: Path) -> None:
    truth = get_profile("a100-llama3-8b")
    worker = sim_worker_factory("--profile", truth.name)
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, "-P", "-m", "kvpilot.cli", "sim", "calibrate", "--base-url", worker.url,
                    "--model", worker.model, "--out", str(out), "--prompt-lengths", "128,512,1024,2048",
                    "--batches", "1,8,32", "--decode-prompts", "64,1024", "--decode-tokens", "24", "--repeats", "3",
                    "--shape-pairs", "6"],
                   check=True, timeout=240, stdout=subprocess.DEVNULL)
    fitted = get_profile(str(out))
    assert json.loads(out.read_text())["points"]["prefill"]
    # Prefill and step costs dominate the timings, so they are recovered well; the small per-sequence
    # terms are within the jitter of a loaded machine and only bounded.
    assert fitted.prefill_token_s == pytest.approx(truth.prefill_token_s, rel=0.25)
    assert fitted.step_s == pytest.approx(truth.step_s, rel=0.5)
    assert fitted.decode_seq_s < 10 * truth.decode_seq_s + 1e-4
    # The simulator builds no kernels per token count: a 1,000-token step's measured extra cost is
    # jitter, small beside the step itself.
    extra = fitted.new_shape_s + fitted.new_shape_token_s * 1000
    assert extra < 0.15 * (truth.step_s + truth.prefill_token_s * 1000)


def test_calibrate_measures_the_busy_front_end_cost_of_a_shared_core(
        sim_worker_factory: Callable[..., SimWorker], tmp_path: Path) -> None:
    """A simulated CPU engine whose arrivals cost 20 ms more when it is decoding: the busy rounds
    (prompts sent while a long stream decodes) find it."""
    truth = get_profile("a100-llama3-8b").model_copy(update={
        "name": "shared-core", "frontend_shares_core": True, "request_overhead_s": 0.005, "busy_frontend_s": 0.02})
    path = tmp_path / "truth.json"
    path.write_text(json.dumps({"profile": truth.model_dump()}))
    worker = sim_worker_factory("--profile", str(path))
    out = tmp_path / "profile.json"
    subprocess.run([sys.executable, "-P", "-m", "kvpilot.cli", "sim", "calibrate", "--base-url", worker.url,
                    "--model", worker.model, "--out", str(out), "--prompt-lengths", "128,512,1024",
                    "--batches", "1,8", "--decode-prompts", "64,512", "--decode-tokens", "24", "--repeats", "3",
                    "--shape-pairs", "0", "--frontend-shares-core"],
                   check=True, timeout=240, stdout=subprocess.DEVNULL)
    fitted = get_profile(str(out))
    assert len(json.loads(out.read_text())["points"]["busy"]) >= 6
    assert fitted.busy_frontend_s == pytest.approx(truth.busy_frontend_s, abs=0.01)
