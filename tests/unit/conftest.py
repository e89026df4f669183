"""The unit tier reads traces from the repository's own slices (tests/data/traces), never from
../shared outside the clone, so it runs from a bare checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

SLICES = Path(__file__).resolve().parents[1] / "data" / "traces"


@pytest.fixture(autouse=True)
def _trace_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVPILOT_TRACES", str(SLICES))
