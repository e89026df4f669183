"""`kvpilot up/demo --time-scale`: a non-positive scale is an argparse error, not the default."""

from __future__ import annotations

import pytest

from kvpilot.cli import build_parser
from kvpilot.demo import DEMO_TIME_SCALE, run_demo


@pytest.mark.parametrize("command", ["demo", "up"])
@pytest.mark.parametrize("value", ["0", "-1", "-0.5", "nan", "inf", "fast"])
def test_a_non_positive_or_non_numeric_time_scale_is_rejected(command: str, value: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--time-scale", value])
    assert exit_.value.code == 2
    assert "--time-scale" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "up"])
def test_a_positive_time_scale_is_taken_as_given(command: str) -> None:
    assert build_parser().parse_args([command, "--time-scale", "0.25"]).time_scale == 0.25


def test_demo_without_a_time_scale_uses_the_default_and_up_runs_in_real_time() -> None:
    assert build_parser().parse_args(["demo"]).time_scale is None   # run_demo fills in DEMO_TIME_SCALE
    assert DEMO_TIME_SCALE > 0
    assert build_parser().parse_args(["up"]).time_scale == 1.0


@pytest.mark.parametrize("value", [0.0, -2.0])
def test_run_demo_rejects_a_non_positive_time_scale_before_starting_anything(value: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        run_demo(time_scale=value, requests=1)
