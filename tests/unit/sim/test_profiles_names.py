"""The operator validates `engine.profile` against kvpilot.names without importing the simulator;
the two lists must stay equal."""

from __future__ import annotations

from kvpilot.names import SIM_PROFILE_NAMES
from kvpilot.sim.profiles import PROFILES


def test_core_knows_every_built_in_profile() -> None:
    assert set(SIM_PROFILE_NAMES) == set(PROFILES)
