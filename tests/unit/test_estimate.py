"""The TTFT predictor's online calibration separates fixed per-request overheads from the
per-token prefill time (the live SLO-fallback rate depended on it)."""

from __future__ import annotations

import random

from kvpilot.router.estimate import LoadEstimator
from kvpilot.router.policy import InstanceLoad, PolicyContext, RequestView

TRUE_TOKEN_S = 3e-6     # what a token of prefill really costs (the local mode's time-scaled H100)
OVERHEAD_S = 5e-3       # HTTP, scheduling, a step: paid by every request whatever its size


def estimator() -> LoadEstimator:
    est = LoadEstimator(PolicyContext(prefill_token_s=TRUE_TOKEN_S), attention_tokens=0)
    est.track([InstanceLoad("w0")])
    return est


def test_fixed_overhead_is_not_charged_to_the_per_token_time() -> None:
    est = estimator()
    rng = random.Random(7)
    for i in range(300):
        # Light load, mostly cached prompts: small uncached work now and then a long prefill.
        work = rng.choice([40, 120, 300, 2_000, 12_000])
        est.dispatched(RequestView(f"r{i}", work, []), "w0")
        est.first_token(f"r{i}", OVERHEAD_S + TRUE_TOKEN_S * work * rng.uniform(0.9, 1.1))
    assert abs(est.token_s["w0"] - TRUE_TOKEN_S) < 0.2 * TRUE_TOKEN_S
    assert abs(est.overhead_s["w0"] - OVERHEAD_S) < 0.3 * OVERHEAD_S
    # So a 60k-token backlog is predicted at about its real 180 ms, not several times that.
    assert est.predicted_ttft("w0", 60_000) < 1.25 * TRUE_TOKEN_S * 60_000


def test_calibration_follows_a_slower_instance_and_stays_positive() -> None:
    est = estimator()
    rng = random.Random(3)
    for _ in range(200):
        work = rng.choice([500, 4_000, 16_000])
        est.calibrate("w0", work, OVERHEAD_S + 4 * TRUE_TOKEN_S * work)   # 4× slower than the prior says
    assert abs(est.token_s["w0"] - 4 * TRUE_TOKEN_S) < 0.1 * TRUE_TOKEN_S
    for _ in range(50):   # equal sizes only: no spread to fit a line; the ratio path keeps it sane
        est.calibrate("w0", 1_000, 1_000 * TRUE_TOKEN_S)
    assert 0 < est.token_s["w0"] < 4 * TRUE_TOKEN_S and est.overhead_s["w0"] >= 0
