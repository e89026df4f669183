"""The router's live dashboard: its data endpoint, and the page rendered by a real browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from kvpilot.testing.router import RouterProcess
from kvpilot.testing.sim import SimWorker
from kvpilot.tokens import block_text


@pytest.fixture
def busy_router(sim_worker_factory: Callable[..., SimWorker], router_factory: Callable[..., RouterProcess]
                ) -> RouterProcess:
    workers = [sim_worker_factory("--profile", "h100-qwen2.5-0.5b", "--time-scale", "5") for _ in range(2)]
    router = router_factory([{"name": "sim-model", "policy": "dualmap", "ttftMs": 500,
                              "endpoints": [{"name": f"w{i}", "url": w.url} for i, w in enumerate(workers)]}])
    oa = router.openai_client()
    for i in range(12):
        for _ in oa.completions.create(model="sim-model", prompt=block_text(i % 3, 300), max_tokens=4, stream=True):
            pass
    return router


def test_dashboard_data_reflects_traffic(busy_router: RouterProcess) -> None:
    with urllib.request.urlopen(busy_router.admin_url + "/dashboard/data", timeout=5) as resp:
        data = json.loads(resp.read())
    model = data["models"][0]
    assert model["name"] == "sim-model" and model["slo_ttft_s"] == 0.5
    assert sorted(e["name"] for e in model["endpoints"]) == ["w0", "w1"]
    assert sum(p["requests"] for p in model["series"]) == 12
    assert any(p["ttft_mean"] is not None and p["ttft_mean"] > 0 for p in model["series"])
    assert "affinity" in {r for p in model["series"] for r in p["reasons"]}
    assert any(p["tpot_mean"] is not None and p["tpot_mean"] > 0 for p in model["series"])
    assert any(p["members"] == 2 for p in model["series"])          # replicas over time
    assert model["scaling"] == [] and model["migrations"] == []      # nothing scaled or migrated here
    with urllib.request.urlopen(busy_router.admin_url + "/dashboard", timeout=5) as resp:
        html = resp.read().decode()
    assert "kvpilot router" in html and "http" not in html.split("<script>")[1]  # no external assets


def test_browser_renders_charts_with_data(busy_router: RouterProcess, tmp_path: Path) -> None:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium not installed: make test installs Debian's chromium for this test")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
             "--virtual-time-budget=4000", "--window-size=1000,900"]
    dom = subprocess.run([*flags, "--dump-dom", busy_router.admin_url + "/dashboard"], capture_output=True, text=True,
                         timeout=60)
    assert 'id="chart"' in dom.stdout, dom.stderr[-2000:]
    def points(chart: str) -> int:
        return int(dom.stdout.split(f'id="{chart}"')[1].split('data-points="')[1].split('"')[0])

    assert points("chart") > 0 and points("tpotchart") > 0  # TTFT and TPOT samples drawn
    assert points("replicas") > 0                           # endpoint count over time drawn
    assert "<td>w0</td>" in dom.stdout and "<td>w1</td>" in dom.stdout
    shot = Path("bench/out/dashboard.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([*flags, f"--screenshot={shot.resolve()}", busy_router.admin_url + "/dashboard"],
                   capture_output=True, timeout=60, check=True)
    assert shot.stat().st_size > 10_000  # a rendered page, kept as a test artifact
