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


def test_shutdown_cancels_waiting_timers_and_refuses_new_work() -> None:
    coalescer = Coalescer(delay=0.3, workers=1)
    ran = threading.Event()
    before = set(threading.enumerate())
    assert coalescer.submit("a", ran.set) and coalescer.submit("b", ran.set)
    timers = [t for t in set(threading.enumerate()) - before if isinstance(t, threading.Timer)]
    assert coalescer.pending() == 2 and len(timers) == 2
    coalescer.shutdown()
    assert coalescer.pending() == 0 and not coalescer.submit("c", ran.set)
    for timer in timers:   # cancelled: their threads end at once, not after the delay
        timer.join(0.1)
        assert not timer.is_alive()
    assert not ran.wait(0.6)   # past the delay: the cancelled timers never ran their refresh


def test_refreshes_share_the_given_executor_so_its_size_bounds_them() -> None:
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(2)
    coalescer = Coalescer(delay=0.01, executor=executor)
    lock, running, most = threading.Lock(), [0], [0]
    done = threading.Semaphore(0)

    def refresh() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        threading.Event().wait(0.1)
        with lock:
            running[0] -= 1
        done.release()

    for key in range(6):
        assert coalescer.submit(key, refresh)
    assert all(done.acquire(timeout=5) for _ in range(6))
    assert most[0] == 2   # never more at once than the executor's threads, which were all used
    coalescer.shutdown()
    assert executor.submit(lambda: 1).result(5) == 1   # an executor passed in is its owner's to stop
    executor.shutdown()
