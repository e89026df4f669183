"""Fixtures of the `vllm` tier: one shared stage of real vLLM instances at a time (see vllm_stage.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm_stage import Stage, Stages


@pytest.fixture(scope="session")
def vllm_stages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stages]:
    stages = Stages(tmp_path_factory.mktemp("vllm"))
    try:
        yield stages
    finally:
        stages.stop()


@pytest.fixture
def pair(vllm_stages: Stages) -> Stage:
    return vllm_stages.get("pair")


@pytest.fixture
def pd(vllm_stages: Stages) -> Stage:
    return vllm_stages.get("pd")




def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A stage starts inside the setup of its first test: two vLLM instances take 50 s on a quiet
    2-core machine and up to 160 s on a busy one, past the suite's default per-test timeout."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.timeout(900))
