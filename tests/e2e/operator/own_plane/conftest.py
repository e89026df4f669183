"""Each module here gets a control plane and an operator of its own (`own_crds`, `own_operator`)
as its `crds` and `operator`:
- modules that crash or flood the plane, so that later modules on the session's plane never see the
  aftermath (a restarted apiserver serves CRD paths late; kwok lags an etcd restart);
- `test_scale_zero`, whose wake needs two 1-GPU pods Running within the request's 80 s: on the
  session's plane (16 GPUs) earlier modules' pods can still hold GPUs while their namespaces
  terminate (`--wait=false`). Twice a CI run timed out there with the autoscaler's 0 → 1 logged
  and no worker pod ever Running (12-01 and 12-02)."""

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
