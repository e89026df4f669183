"""The simulator's fault knobs, which later tests of retries and breakers rely on."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

import openai
import pytest

from kvpilot.procs import wait_for
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text

Factory = Callable[..., SimWorker]



def test_error_rate_fails_requests_with_500(sim_worker_factory: Factory) -> None:
    worker = sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--error-rate", "1.0")
    with pytest.raises(openai.InternalServerError) as err:
        worker.openai_client().completions.create(model="sim-model", prompt="hello there", max_tokens=2)
    assert "injected failure" in str(err.value)


def test_slow_start_reports_unhealthy_first(sim_worker_factory: Factory) -> None:
    worker = sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--slow-start", "2", wait=False)
    wait_for(lambda: _status(worker) == 503, 20, "the worker to answer /health with 503", worker.proc)
    t0 = time.monotonic()
    wait_for(lambda: _status(worker) == 200, 10, "the worker to become healthy", worker.proc)
    assert time.monotonic() - t0 < 3


def _status(worker: SimWorker) -> int:
    try:
        with urllib.request.urlopen(worker.url + "/health", timeout=1) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_crash_after_tokens_kills_the_stream(sim_worker_factory: Factory) -> None:
    worker = sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--crash-after-tokens", "5")
    got = []
    with pytest.raises((openai.APIError, openai.APIConnectionError)):
        for chunk in worker.openai_client().completions.create(model="sim-model", prompt=block_text(1, 64),
                                                        max_tokens=50, stream=True):
            got.append(chunk.choices[0].text)
    assert len("".join(got).split()) < 50
    wait_for(lambda: not worker.proc.alive(), 5, "the worker process to exit")
    assert worker.proc.returncode() == 17
