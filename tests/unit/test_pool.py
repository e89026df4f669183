"""The proxy's endpoint pool: breakers, saturation and a stable list for the policy."""

from __future__ import annotations

from kvpilot.router.config import Endpoint
from kvpilot.router.policies import make_policy
from kvpilot.router.policy import Outcome, RequestView
from kvpilot.router.pool import Pool


def make_pool(n: int = 3, max_inflight: int = 2) -> Pool:
    endpoints = [Endpoint(name=f"w{i}", url=f"http://127.0.0.1:{9000 + i}") for i in range(n)]  # type: ignore[arg-type]
    return Pool(endpoints, make_policy("round-robin"), breaker_failures=2, breaker_cooldown_s=60,
                max_inflight=max_inflight)


def req(i: int) -> RequestView:
    return RequestView(f"r{i}", 100, [])


def test_healthy_list_is_stable_until_a_breaker_opens() -> None:
    pool = make_pool()
    first = pool.healthy()
    assert pool.healthy() is first and len(first) == 3
    w0 = pool.by_name["w0"]
    assert not pool.failed(w0)          # one failure: still in
    assert pool.healthy() is first
    assert pool.failed(w0)              # second: the breaker opens
    assert [m.endpoint.name for m in pool.healthy()] == ["w1", "w2"]
    for i in range(4):
        chosen = pool.choose(req(i))
        assert chosen is not None and chosen[0].endpoint.name != "w0"


def test_a_revived_member_is_routable_again_before_its_cooldown() -> None:
    pool = make_pool()
    w0 = pool.by_name["w0"]
    pool.failed(w0)
    pool.failed(w0)                     # open for 60 s
    assert "w0" not in [m.endpoint.name for m in pool.healthy()]
    pool.revive(w0)                     # it answered a health check (a cold start's early failures)
    assert [m.endpoint.name for m in pool.healthy()] == ["w0", "w1", "w2"]
    assert not pool.failed(w0)          # a fresh count: one failure does not reopen it


def test_saturated_members_are_skipped_and_a_full_pool_refuses() -> None:
    pool = make_pool(n=2, max_inflight=1)
    a = pool.choose(req(0))
    b = pool.choose(req(1))
    assert a is not None and b is not None and a[0] is not b[0]
    assert pool.saturated() and pool.choose(req(2)) is None
    pool.finish(a[0], req(0), Outcome("w0", "ok", True))
    again = pool.choose(req(3))
    assert again is not None and again[0] is a[0]


def test_exclusion_skips_tried_endpoints() -> None:
    pool = make_pool()
    chosen = [pool.choose(req(i), frozenset({"w1"})) for i in range(4)]
    assert all(c is not None and c[0].endpoint.name != "w1" for c in chosen)
    assert pool.choose(req(9), frozenset({"w0", "w1", "w2"})) is None


def test_json_logs_carry_request_context() -> None:
    import json
    import logging

    from kvpilot.logs import JsonFormatter

    record = logging.makeLogRecord({"name": "kvpilot.router", "levelname": "WARNING", "msg": "request failed: %s",
                                    "args": ("boom",), "request_id": "abc", "endpoint": "w1"})
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "request failed: boom" and line["request_id"] == "abc" and line["endpoint"] == "w1"
    assert line["level"] == "warning" and line["ts"].endswith("Z")
