"""Coalescing refreshes: many requests for one key within the delay run it once; a later request runs it again."""

from __future__ import annotations

import threading

from kvpilot.operator.coalesce import Coalescer


def test_requests_for_a_key_coalesce_until_it_runs() -> None:
    coalescer = Coalescer(delay=0.2, workers=2)
    runs: list[str] = []
    done = threading.Event()

    def refresh(key: str) -> None:
        runs.append(key)
        if len(runs) == 2:
            done.set()

    scheduled = [coalescer.submit("a", lambda: refresh("a")) for _ in range(10)]
    scheduled.append(coalescer.submit("b", lambda: refresh("b")))
    assert scheduled == [True] + [False] * 9 + [True]
    assert done.wait(5) and sorted(runs) == ["a", "b"]
    again = threading.Event()
    assert coalescer.submit("a", again.set)  # after its run a key can be scheduled anew
    assert again.wait(5)
    coalescer.shutdown()


def test_a_failing_refresh_does_not_block_its_key() -> None:
    coalescer = Coalescer(delay=0.05, workers=1)
    ran = threading.Event()

    def boom() -> None:
        ran.set()
        raise RuntimeError("apiserver said no")

    assert coalescer.submit("k", boom) and ran.wait(5)
    ok = threading.Event()
    for _ in range(100):  # the failed run has released its key
        if coalescer.submit("k", ok.set):
            break
        ok.wait(0.05)
    assert ok.wait(5)
    coalescer.shutdown()
