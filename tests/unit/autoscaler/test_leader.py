"""Leader election's rule: hold while renewing, take over only a lapsed lease."""

from __future__ import annotations

import datetime as dt

from kvpilot.autoscaler.leader import LeaseView, next_lease

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def at(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


def test_first_candidate_creates_the_lease_and_renews_it() -> None:
    a = next_lease(None, "a", at(0), 15)
    assert a is not None and (a.holder, a.transitions, a.acquired) == ("a", 0, at(0))
    renewed = next_lease(a, "a", at(5), 15)
    assert renewed is not None and renewed.renewed == at(5) and renewed.acquired == at(0)


def test_a_standby_waits_while_the_holder_renews_and_takes_over_once_it_lapses() -> None:
    held = LeaseView("a", at(0), 15, 3, at(0))
    assert next_lease(held, "b", at(10), 15) is None          # renewed 10 s ago: a still leads
    assert next_lease(held, "b", at(15), 15) is None          # exactly the duration: not yet
    taken = next_lease(held, "b", at(15.5), 15)
    assert taken is not None and taken.holder == "b" and taken.transitions == 4 and taken.acquired == at(15.5)


def test_a_released_lease_is_free_at_once() -> None:
    released = LeaseView(None, at(0), 15, 1)
    taken = next_lease(released, "b", at(1), 15)
    assert taken is not None and taken.holder == "b"
