"""API keys and their limits, as pure logic: the key table, a token bucket, per-key admission.

The shell (`kvpilot.router.auth`) reads the keys file and asks these classes; nothing here reads a
clock or a file, so the limits are tested with a fake clock (tests/unit/test_router_keys.py).

The keys file (a mounted Kubernetes Secret, YAML or JSON) lists keys as plain text (`key`) or as
their SHA-256 hex digest (`sha256`, so the Secret need not hold the key itself):

    keys:
      - name: team-a            # what logs and metrics say; the key itself is never logged
        sha256: 9f86d081...
        requestsPerSecond: 20   # token bucket: sustained rate ...
        burst: 40               # ... and its depth (default: one second's worth, at least 1)
        maxConcurrency: 8       # requests in flight at once
      - name: ci
        key: sk-ci-123
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class KeySpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1)
    key: str | None = Field(None, min_length=8)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    requests_per_second: float | None = Field(None, gt=0, alias="requestsPerSecond")
    burst: float | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, gt=0, alias="maxConcurrency")

    @model_validator(mode="after")
    def _one_secret(self) -> KeySpec:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError(f"key {self.name!r}: give exactly one of `key` and `sha256`")
        return self

    def digest(self) -> str:
        return self.sha256.lower() if self.sha256 else hashlib.sha256(str(self.key).encode()).hexdigest()


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeySpec]

    @classmethod
    def parse(cls, doc: Any) -> KeysFile:
        """A `{keys: [...]}` document or a bare list of keys."""
        keys = cls.model_validate({"keys": doc} if isinstance(doc, list) else doc)
        names = [k.name for k in keys.keys]
        if len(names) != len(set(names)):
            raise ValueError("duplicate key names")
        return keys


class KeyTable:
    """Presented key → its spec, by SHA-256 digest (a dict lookup; no key is kept in plain text)."""

    def __init__(self, keys: list[KeySpec]) -> None:
        self.by_digest = {k.digest(): k for k in keys}

    def lookup(self, presented: str) -> KeySpec | None:
        return self.by_digest.get(hashlib.sha256(presented.encode()).hexdigest())


@dataclass
class TokenBucket:
    """`rate` tokens a second up to `burst`; a request takes one."""

    rate: float
    burst: float
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> float:
        """0 when a token was taken; otherwise the seconds until one will be there."""
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _KeyState:
    limits: tuple[float | None, float | None, int | None]
    bucket: TokenBucket | None
    in_flight: int = 0


@dataclass(frozen=True)
class Denied:
    reason: str
    retry_after_s: int


@dataclass
class Limiter:
    """Per key: a request-rate token bucket and a concurrency cap. A key's state survives a reload
    of the keys file unless its limits changed."""

    states: dict[str, _KeyState] = field(default_factory=dict)

    def _state(self, spec: KeySpec) -> _KeyState:
        limits = (spec.requests_per_second, spec.burst, spec.max_concurrency)
        st = self.states.get(spec.name)
        if st is None or st.limits != limits:
            bucket = None
            if spec.requests_per_second is not None:
                burst = spec.burst if spec.burst is not None else max(1.0, spec.requests_per_second)
                bucket = TokenBucket(spec.requests_per_second, burst)
            st = _KeyState(limits, bucket, st.in_flight if st else 0)
            self.states[spec.name] = st
        return st

    def admit(self, spec: KeySpec, now: float) -> Denied | None:
        """None: admitted (call `release` when it is done); else why not and when to retry."""
        st = self._state(spec)
        if spec.max_concurrency is not None and st.in_flight >= spec.max_concurrency:
            return Denied(f"key {spec.name!r} has {st.in_flight} requests in flight, its limit", 1)
        if st.bucket is not None:
            wait = st.bucket.take(now)
            if wait > 0:
                return Denied(f"key {spec.name!r} is over {spec.requests_per_second:g} requests per second",
                              max(1, math.ceil(wait)))
        st.in_flight += 1
        return None

    def release(self, spec: KeySpec) -> None:
        st = self.states.get(spec.name)
        if st is not None and st.in_flight > 0:
            st.in_flight -= 1

    def forget(self, names: set[str]) -> None:
        """Drop the state of keys no longer in the file."""
        for name in set(self.states) - names:
            if self.states[name].in_flight == 0:
                del self.states[name]
