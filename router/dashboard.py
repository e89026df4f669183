"""The router's live dashboard: what it sees, over the last few minutes, at `/dashboard`.

`Timeline` keeps a bounded ring of one-second buckets per model (requests, TTFT and TPOT samples,
routing reasons, endpoint count) fed from the proxy's hot path with O(1) work; `/dashboard/data` serialises it with the
pools' current loads; `/dashboard` is one static HTML page (no external assets) that polls it.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

HORIZON_S = 300


@dataclass
class Bucket:
    second: int
    requests: int = 0
    ttft_sum: float = 0.0
    ttft_max: float = 0.0
    ttft_n: int = 0
    tpot_sum: float = 0.0
    tpot_n: int = 0
    members: int | None = None          # endpoints in the pools at this second (replicas over time)
    reasons: Counter[str] = field(default_factory=Counter)


class Timeline:
    def __init__(self, horizon_s: int = HORIZON_S) -> None:
        self.buckets: deque[Bucket] = deque(maxlen=horizon_s)

    def _bucket(self) -> Bucket:
        now = int(time.time())
        if not self.buckets or self.buckets[-1].second != now:
            self.buckets.append(Bucket(now))
        return self.buckets[-1]

    def decided(self, reason: str, new_request: bool = True) -> None:
        """A routing decision; a retry or a P/D request's decode leg is not a new request."""
        b = self._bucket()
        b.requests += new_request
        b.reasons[reason] += 1

    def first_token(self, ttft_s: float) -> None:
        b = self._bucket()
        b.ttft_sum += ttft_s
        b.ttft_n += 1
        b.ttft_max = max(b.ttft_max, ttft_s)

    def tpot(self, tpot_s: float) -> None:
        b = self._bucket()
        b.tpot_sum += tpot_s
        b.tpot_n += 1

    def members(self, n: int) -> None:
        self._bucket().members = n

    def series(self) -> list[dict[str, Any]]:
        return [{"t": b.second, "requests": b.requests, "ttft_mean": b.ttft_sum / b.ttft_n if b.ttft_n else None,
                 "ttft_max": b.ttft_max if b.ttft_n else None,
                 "tpot_mean": b.tpot_sum / b.tpot_n if b.tpot_n else None, "members": b.members,
                 "reasons": dict(b.reasons)} for b in self.buckets]


def page() -> str:
    return resources.files("kvpilot.router").joinpath("static/dashboard.html").read_text()
