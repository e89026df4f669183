"""Managed objects followed by listing them, for kinds whose CRD may vanish while the operator runs.

kopf watches a resource from the moment its discovery shows it. When the CRD is deleted (a team
uninstalls KubeRay), the apiserver ends the watch and kopf reconnects 0.1 s later; if kopf's own
discovery has not seen the deletion by then, the reconnect gets a 404, which kopf treats as fatal,
and the whole operator exits (kopf's `_update_resources` admits the race). Under load that
happened in the e2e tier: the session's operator died when a test removed KubeRay's CRDs. Listed
every few seconds instead, a vanished API is only "not served". The cost: one list per interval,
and a status change arrives up to an interval late (a RayService takes minutes to become ready).
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]


class Listed:
    """The objects of one kind as the last list showed them, and what changed since."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], Obj] = {}   # (namespace, name) → metadata

    def update(self, items: list[Obj]) -> list[tuple[str, Obj]]:
        """(event type, metadata) per change since the last list: "ADDED" for an object not seen
        before, "MODIFIED" for one that changed (its resourceVersion moved), "DELETED" for one gone."""
        now = {(obj["metadata"]["namespace"], obj["metadata"]["name"]): obj["metadata"] for obj in items}
        changes: list[tuple[str, Obj]] = []
        for key, meta in now.items():
            before = self._seen.get(key)
            if before is None:
                changes.append(("ADDED", meta))
            elif before.get("resourceVersion") != meta.get("resourceVersion"):
                changes.append(("MODIFIED", meta))
        changes += [("DELETED", meta) for key, meta in self._seen.items() if key not in now]
        self._seen = now
        return changes
