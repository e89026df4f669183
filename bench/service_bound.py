"""A workload's service bound: the most requests per second any router can serve on a fleet.

Replay the requests, in arrival order, through one global LRU holding the whole fleet's KV
(`instances` × the profile's capacity, more than any partition of it can hold, and ignoring that
running requests occupy most of it), counting each request's leading hits before inserting it.
With those ideal hits, the profile's cost model gives each request's GPU time (prefill of the
uncached tokens, causal attention over the context, decode of the output, and *no* fixed step
cost, so the bound is optimistic), and the fleet serves at most instances / mean GPU time.
Also reported: the share of requests whose solo, all-cached-but-the-uncached prefill already
exceeds the TTFT SLO: past 10% of requests no router can reach 90% attainment.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvpilot.sim.profiles import Profile
from kvpilot.sim.workload import RequestSpec


@dataclass(slots=True)
class Bound:
    rate: float              # req/s: the fleet's service rate with ideal cache hits
    ideal_hit_rate: float    # token share served from the global LRU
    too_long: float          # share of requests whose prefill alone (with ideal hits) exceeds the SLO


def service_bound(specs: list[RequestSpec], profile: Profile, instances: int, slo_ttft_s: float) -> Bound:
    if not specs:
        return Bound(0.0, 0.0, 0.0)
    seg = specs[0].segment_tokens
    capacity = instances * profile.kv_capacity_tokens // seg
    lru: OrderedDict[int, None] = OrderedDict()
    total_s = hit_tokens = prompt_tokens = 0.0
    too_long = 0
    for s in sorted(specs, key=lambda r: r.arrival):
        hashes = s.block_hashes(seg)   # chained: equal hash ⇒ equal prefix up to there
        n = len(hashes)
        c = 0
        while c < n and hashes[c] in lru:
            c += 1
        cached = min(s.prompt_tokens - 1, c * seg)
        u = s.prompt_tokens - cached
        prefill = u * profile.prefill_token_s + profile.attn_pair_s * u * (cached + u / 2)
        out = s.max_tokens
        decode = out * (profile.decode_seq_s + profile.decode_ctx_s * (s.prompt_tokens + out / 2))
        total_s += prefill + decode
        too_long += prefill > slo_ttft_s
        hit_tokens += cached
        prompt_tokens += s.prompt_tokens
        # Tail first, so the head is the most recent (the engines evict tails first too).
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > capacity:
            lru.popitem(last=False)
    return Bound(instances * len(specs) / total_s, hit_tokens / prompt_tokens, too_long / len(specs))
