"""The shadow cache's shortcuts change nothing: its match memo (a decision matches the chosen
instance again when it dispatches) and DualMap's lazy comparison (the second candidate is probed
once where the first one's hit ends, and matched in full only when it wins) give the same cache
answers and the same routing decisions as the plain computation."""

from __future__ import annotations

import random

import pytest

from kvpilot.router import estimate
from kvpilot.router.estimate import ShadowCache
from kvpilot.router.policies.dualmap import DualMap
from kvpilot.router.policy import Decision, InstanceLoad, PolicyContext, RequestView
from kvpilot.tokens import segment_block_hashes


class PerBlockLRU(ShadowCache):
    """The reference: the same LRU, forgetting its memo before every match."""

    __slots__ = ()

    def match(self, hashes: list[int]) -> int:
        self._last = (None, 0)
        return super().match(hashes)


class EagerDualMap(DualMap):
    """The reference decision: both candidates matched in full, both waits computed."""

    def route(self, request: RequestView, instances: list[InstanceLoad]) -> Decision:  # type: ignore[override]
        self._sync(instances)
        assert self.adaptive is not None
        c1, c2 = self._ring.candidates(self.adaptive.key(request.block_hashes)[0])
        u1, u2 = self.estimate.uncached(c1, request), self.estimate.uncached(c2, request)
        best, other, ub, uo = (c1, c2, u1, u2) if u1 <= u2 else (c2, c1, u2, u1)
        t_best, t_other = self.holding.wait_for(best, ub), self.holding.wait_for(other, uo)
        if t_best > self.theta * self.context.slo_ttft_s and t_other < t_best:
            self._other[request.request_id] = best
            return Decision(self._members.index[other], "slo-fallback")
        self._other[request.request_id] = other
        return Decision(self._members.index[best], "affinity")


def workload(n: int, seed: int, block: int = 256) -> list[RequestView]:
    """Mooncake-like: shared heads, Zipf-ish conversations that grow, unique tails, 1k-64k tokens."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        convo = int(rng.paretovariate(1.1)) % 300
        turns = rng.randint(1, 12)
        segs = [0, 1_000_000 + convo] + [2_000_000 + convo * 100 + t for t in range(turns)] + [3_000_000 + i]
        tokens = rng.choice([1024, 3000, 8192, 20_000, 32_768, 65_536])
        out.append(RequestView(f"r{i}", tokens, segment_block_hashes(segs, 512, tokens, block)[:256], float(i)))
    return out


@pytest.mark.parametrize("capacity", [40, 300, 5_000])
def test_memoized_cache_is_the_plain_lru(capacity: int) -> None:
    new, ref = ShadowCache(capacity), PerBlockLRU(capacity)
    rng = random.Random(capacity)
    reqs = workload(3000, seed=capacity)
    for req in reqs:
        probe = rng.choice(reqs).block_hashes
        assert new.match(probe) == ref.match(probe)
        assert new.match(req.block_hashes) == ref.match(req.block_hashes)
        new.insert(req.block_hashes)
        ref.insert(req.block_hashes)
        assert new.match(req.block_hashes) == ref.match(req.block_hashes)   # the memo is not stale after an insert
        assert len(new) == len(ref)


@pytest.mark.parametrize("capacity_tokens", [445_000, 60_000])   # roomy, and evicting all the time
def test_dualmap_decisions_are_unchanged(monkeypatch: pytest.MonkeyPatch, capacity_tokens: int) -> None:
    def decisions(cache_class: type, policy_class: type[DualMap]) -> list[tuple[int, str]]:
        with monkeypatch.context() as m:
            m.setattr(estimate, "ShadowCache", cache_class)
            policy = policy_class(PolicyContext(slo_ttft_s=5.0, block_size=256, kv_capacity_tokens=capacity_tokens))
            loads = [InstanceLoad(f"pod-{i}") for i in range(16)]
            out = []
            pending: list[str] = []
            for req in workload(4000, seed=11):
                d = policy.route(req, loads)
                policy.on_dispatch(req, d.index, loads)
                out.append((d.index, d.reason))
                pending.append(req.request_id)
                if len(pending) > 40:   # keep a backlog so the SLO switch is exercised too
                    policy.on_first_token(pending.pop(0), 0.5)
            return out

    new, ref = decisions(ShadowCache, DualMap), decisions(PerBlockLRU, EagerDualMap)
    assert new == ref
    assert {reason for _, reason in new} == {"affinity", "slo-fallback"}
