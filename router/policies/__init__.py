"""One routing policy per module, all behind `kvpilot.router.policy.Policy`."""

from __future__ import annotations

from collections.abc import Callable

from kvpilot.router.policies.affinity import Affinity
from kvpilot.router.policies.cache_aware import CacheAware
from kvpilot.router.policies.chwbl import CHWBL
from kvpilot.router.policies.dualmap import DualMap
from kvpilot.router.policies.least_loaded import LeastLoaded
from kvpilot.router.policies.min_ttft import MinTTFT
from kvpilot.router.policies.round_robin import RoundRobin
from kvpilot.router.policy import Policy, PolicyContext

POLICIES: dict[str, Callable[[PolicyContext], Policy]] = {
    p.name: p for p in (RoundRobin, LeastLoaded, CHWBL, CacheAware, MinTTFT, Affinity, DualMap)
}


def make_policy(name: str, context: PolicyContext | None = None) -> Policy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return factory(context or PolicyContext())
