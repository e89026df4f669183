"""One routing policy per module, all behind `kvpilot.router.policy.Policy`."""

from __future__ import annotations

from kvpilot.router.policies.round_robin import RoundRobin
from kvpilot.router.policy import Policy

POLICIES: dict[str, type[Policy]] = {RoundRobin.name: RoundRobin}


def make_policy(name: str, seed: int = 0) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None
    return cls(seed=seed)  # type: ignore[call-arg]
