"""Whether this replica is the one kopf lets act, read from the same peering object kopf keeps.

kopf pauses its own watches and handlers on a standby replica, but not work the operator runs
itself, such as the periodic resync: that asks here first. The rule is kopf's: a replica acts
when no other live peer has a priority as high as its own (a tie pauses both).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class Me:
    peering: str
    identity: str
    priority: int


def blocking_peers(peering: Obj, me: Me, now: datetime) -> list[str]:
    """The live peers (other than me) whose priority is at least mine, from a (Cluster)KopfPeering."""
    blocking = []
    for identity, info in ((peering or {}).get("status") or {}).items():
        if identity == me.identity or not isinstance(info, dict):
            continue
        try:
            lastseen = datetime.fromisoformat(str(info["lastseen"]))
        except (KeyError, ValueError):
            continue
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=UTC)
        alive = lastseen + timedelta(seconds=int(info.get("lifetime", 60))) > now
        if alive and int(info.get("priority", 0)) >= me.priority:
            blocking.append(identity)
    return blocking
