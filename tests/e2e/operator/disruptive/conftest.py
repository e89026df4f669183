"""Modules here crash or flood the control plane: each gets a plane and an operator of its own
(`own_crds`, `own_operator`) as its `crds` and `operator`, so that later modules on the session's
plane never see the aftermath (a restarted apiserver serves CRD paths late; kwok lags an etcd restart)."""

from __future__ import annotations

from typing import Any

import pytest

from kvpilot.testing.k8s import ControlPlane


@pytest.fixture(scope="module")
def crds(own_crds: ControlPlane) -> ControlPlane:
    return own_crds


@pytest.fixture(scope="module")
def operator(own_operator: Any) -> Any:
    return own_operator
