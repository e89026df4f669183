"""Test tiers follow folders: tests/unit, tests/integration, tests/e2e, tests/vllm get the matching marker,
so `pytest -m unit` selects by tier without every test repeating its marker."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["kvpilot.testing.pytest_plugin"]

_TIERS = ("unit", "integration", "e2e", "vllm")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in _TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
