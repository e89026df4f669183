"""promtool over kvpilot's rules: they load, and each alert fires on series that break its SLO and
stays silent on series that keep it (tests/integration/prometheus/rules_test.yaml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from kvpilot.dashboards.queries import RULES

TESTS = Path(__file__).parent / "prometheus" / "rules_test.yaml"
PROMTOOL = shutil.which("promtool")


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None, "promtool not found: it ships with Debian's prometheus (make test installs it)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_check_rules() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    rules = yaml.safe_load(RULES.read_text())
    assert f"SUCCESS: {sum(len(g['rules']) for g in rules['groups'])} rules found" in out.stdout


def _stripped(tmp_path: Path) -> Path:
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    shutil.copy(TESTS, tmp_path / "rules_test.yaml")
    return tmp_path / "rules_test.yaml"


def test_alerts_fire_on_breaches_only(tmp_path: Path) -> None:
    out = _promtool("test", "rules", str(_stripped(tmp_path)), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # Every alert the rules define is tested.
    tested = {t["alertname"] for case in yaml.safe_load(TESTS.read_text())["tests"] for t in case["alert_rule_test"]}
    defined = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    assert tested == defined


def test_a_broken_threshold_fails_the_tests(tmp_path: Path) -> None:
    """The tests can fail: a burn-rate alert that also fired on the `meh` service is caught."""
    test_file = _stripped(tmp_path)
    rules = yaml.safe_load((tmp_path / "rules.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "KvpilotTTFTBudgetBurnFast":
                rule["expr"] = rule["expr"].replace("> 6", "> 3")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    out = _promtool("test", "rules", str(test_file), cwd=tmp_path)
    assert out.returncode != 0 and "KvpilotTTFTBudgetBurnFast" in out.stdout + out.stderr
