"""API keys and their limits with a fake clock: the token bucket, the concurrency cap, the keys
file's reload (changed, revoked, broken, gone) and the admin token check."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from kvpilot.router.auth import FileToken, KeyStore
from kvpilot.router.keys import KeysFile, KeySpec, KeyTable, Limiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)      # one token comes back every 0.5 s
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) > 0
    assert [bucket.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]   # refilled, but only up to the burst
    assert bucket.take(10.0) > 0


def test_limiter_caps_rate_and_concurrency_per_key() -> None:
    limiter = Limiter()
    a = KeySpec(name="a", key="key-aaaaaaaa", requestsPerSecond=1, burst=2)
    b = KeySpec(name="b", key="key-bbbbbbbb", maxConcurrency=2)
    assert limiter.admit(a, 0.0) is None and limiter.admit(a, 0.0) is None
    denied = limiter.admit(a, 0.0)
    assert denied is not None and denied.retry_after_s == 1 and "per second" in denied.reason
    assert limiter.admit(a, 1.0) is None               # a second later, one more
    assert limiter.admit(b, 0.0) is None and limiter.admit(b, 0.0) is None
    denied = limiter.admit(b, 0.0)
    assert denied is not None and "in flight" in denied.reason
    limiter.release(b)
    assert limiter.admit(b, 0.0) is None               # a finished request frees a slot
    assert limiter.admit(a, 1.0) is not None           # keys do not share limits


def test_changed_limits_reset_the_bucket_but_keep_in_flight() -> None:
    limiter = Limiter()
    a = KeySpec(name="a", key="key-aaaaaaaa", requestsPerSecond=1, maxConcurrency=5)
    assert limiter.admit(a, 0.0) is None
    assert limiter.admit(a, 0.0) is not None
    looser = KeySpec(name="a", key="key-aaaaaaaa", requestsPerSecond=10, maxConcurrency=1)
    denied = limiter.admit(looser, 0.0)
    assert denied is not None and "in flight" in denied.reason   # the first request still counts


def test_keys_by_plain_text_or_digest_and_a_bad_file_is_refused() -> None:
    digest = hashlib.sha256(b"sk-secret-1").hexdigest()
    table = KeyTable(KeysFile.parse([{"name": "x", "sha256": digest}, {"name": "y", "key": "sk-other-2"}]).keys)
    assert table.lookup("sk-secret-1") is not None and table.lookup("sk-secret-1").name == "x"  # type: ignore[union-attr]
    assert table.lookup("sk-other-2") is not None
    assert table.lookup("sk-secret-") is None
    with pytest.raises(ValidationError):
        KeysFile.parse([{"name": "x", "key": "sk-secret-1", "sha256": digest}])
    with pytest.raises(ValidationError):
        KeysFile.parse({"keys": [{"name": "x"}]})
    with pytest.raises(ValueError, match="duplicate"):
        KeysFile.parse([{"name": "x", "key": "sk-secret-1"}, {"name": "x", "key": "sk-secret-2"}])


def _write(path: Path, text: str, mtime: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime, mtime))


def test_keystore_reloads_changes_only_after_its_interval(tmp_path: Path) -> None:
    path, clock = tmp_path / "keys.yaml", Clock()
    _write(path, "keys: [{name: a, key: sk-aaaaaaaa}]\n", 1_000_000_000)
    store = KeyStore(path, reload_s=2.0, clock=clock)
    assert store.table.lookup("sk-aaaaaaaa") is not None
    _write(path, "keys: [{name: b, key: sk-bbbbbbbb}]\n", 2_000_000_000)   # a revoked, b added
    clock.t += 1.0
    store.refresh()
    assert store.table.lookup("sk-aaaaaaaa") is not None, "not re-read before the interval"
    clock.t += 1.5
    store.refresh()
    assert store.table.lookup("sk-aaaaaaaa") is None and store.table.lookup("sk-bbbbbbbb") is not None
    _write(path, "keys: [{name: c}]\n", 3_000_000_000)                     # broken: keep what was read
    clock.t += 3
    store.refresh()
    assert store.table.lookup("sk-bbbbbbbb") is not None
    path.unlink()                                                          # gone: nobody gets in
    clock.t += 3
    store.refresh()
    assert store.table.lookup("sk-bbbbbbbb") is None and store.names == set()


def test_keystore_never_logs_a_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, clock = tmp_path / "keys.yaml", Clock()
    _write(path, "keys: [{name: team-a, key: sk-very-secret}]\n", 1_000_000_000)
    caplog.set_level("DEBUG")
    store = KeyStore(path, reload_s=1.0, clock=clock)
    _write(path, "keys: [{name: team-a, key: sk-very-secret, sha256: nothex}]\n", 2_000_000_000)
    clock.t += 2
    store.refresh()
    assert "team-a" in caplog.text and "sk-very-secret" not in caplog.text


def test_admin_token_is_reread_after_its_interval(tmp_path: Path) -> None:
    path, clock = tmp_path / "token", Clock()
    path.write_text("first\n")
    token = FileToken(path, reload_s=2.0, clock=clock)
    assert token() == "first"
    path.write_text("second")
    assert token() == "first"
    clock.t += 2
    assert token() == "second"
