"""kopf's rule for who acts, as the operator's own resync reads it from the peering object."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kvpilot.operator.peers import Me, blocking_peers

NOW = datetime(2026, 11, 22, 5, 0, tzinfo=UTC)
ME = Me("kvpilot", "me", 100)


def _peer(priority: int, seconds_ago: float, lifetime: int = 60) -> dict[str, object]:
    return {"priority": priority, "lifetime": lifetime, "lastseen": (NOW - timedelta(seconds=seconds_ago)).isoformat()}


def test_a_live_higher_or_equal_peer_blocks() -> None:
    peering = {"status": {"me": _peer(100, 1), "high": _peer(200, 5), "tie": _peer(100, 5), "low": _peer(50, 5)}}
    assert sorted(blocking_peers(peering, ME, NOW)) == ["high", "tie"]


def test_dead_or_lower_peers_and_an_empty_object_do_not_block() -> None:
    peering = {"status": {"me": _peer(100, 1), "gone": _peer(200, 11, lifetime=10), "low": _peer(1, 0)}}
    assert blocking_peers(peering, ME, NOW) == []
    assert blocking_peers({}, ME, NOW) == []
    assert blocking_peers({"status": {"junk": "x", "bad": {"lastseen": "never"}}}, ME, NOW) == []
