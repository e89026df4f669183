"""Fixtures of the `vllm` tier: one shared stage of real vLLM instances at a time (see vllm_stage.py)."""

from __future__ import annotations

from collections.abc import Iterator

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


