"""The test tree has no `__init__.py` files, so pytest imports each module by its basename: two
modules of one name anywhere under tests/ make every tier's collection fail (it happened twice)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_basename() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [name for name, n in names.items() if n > 1]
