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


def test_shutdown_cancels_waiting_keys_and_refuses_new_work() -> None:
    coalescer = Coalescer(delay=0.3, workers=1)
    ran = threading.Event()
    before = set(threading.enumerate())
    assert coalescer.submit("a", ran.set) and coalescer.submit("b", ran.set)
    assert coalescer.pending() == 2
    coalescer.shutdown()
    assert coalescer.pending() == 0 and not coalescer.submit("c", ran.set)
    assert not set(threading.enumerate()) - before   # the waiting thread ended at once, not after the delay
    assert not ran.wait(0.6)   # past the delay: the dropped keys never ran their refresh


def test_many_pending_keys_wait_on_one_thread_and_run_in_order() -> None:
    """A burst of services asks for many keys at once: one thread waits for them all (a timer
    thread per key was 100 threads for 100 services), and each runs once, first asked first."""
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(1)
    before = set(threading.enumerate())
    coalescer = Coalescer(delay=0.2, executor=executor)
    runs: list[int] = []
    done = threading.Semaphore(0)

    def refresh(key: int) -> None:
        runs.append(key)
        done.release()

    for key in range(100):
        assert coalescer.submit(key, lambda key=key: refresh(key))
        assert not coalescer.submit(key, lambda: None)
    assert len(set(threading.enumerate()) - before) == 1 and coalescer.pending() == 100
    assert all(done.acquire(timeout=5) for _ in range(100))
    assert runs == list(range(100))
    coalescer.shutdown()
    executor.shutdown()


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
