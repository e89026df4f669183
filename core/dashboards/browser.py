"""Headless Chromium over the local dashboard viewer: what it rendered (`panel_status`) and a
screenshot. Debian's `chromium`, which `make test` installs."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html import unescape
from pathlib import Path


def _flags(profile: Path, width: int, height: int, budget_ms: int) -> list[str]:
    browser = shutil.which("chromium")
    if browser is None:
        raise RuntimeError("chromium not installed: make test installs Debian's chromium")
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", f"--window-size={width},{height}"]


@dataclass(frozen=True)
class Rendered:
    panels: int
    ok: int
    failed: list[str]     # titles of panels that drew no data or got an error
    error: str = ""


def panel_status(url: str, budget_ms: int = 30_000) -> Rendered:
    """Load one dashboard (`viewer/#uid`) and read the viewer's #status once every panel answered."""
    with tempfile.TemporaryDirectory(prefix="kvpilot-chromium-") as profile:
        out = subprocess.run([*_flags(Path(profile), 1600, 1200, budget_ms), "--dump-dom", url],
                             capture_output=True, text=True, timeout=120)
    m = re.search(r'<div id="status"([^>]*)>', out.stdout)
    if m is None:
        return Rendered(0, 0, [], f"no #status in the page: {out.stderr[-500:]}")
    attrs = {k: unescape(v) for k, v in re.findall(r'data-(\w+)="([^"]*)"', m.group(1))}
    if attrs.get("done") != "1":
        return Rendered(0, 0, [], "the viewer did not finish within the time budget")
    return Rendered(int(attrs.get("panels", 0)), int(attrs.get("ok", 0)),
                    [t for t in attrs.get("failed", "").split("|") if t], attrs.get("error", ""))


def screenshot(url: str, path: Path, width: int = 1600, height: int = 1400, budget_ms: int = 30_000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvpilot-chromium-") as profile:
        subprocess.run([*_flags(Path(profile), width, height, budget_ms), f"--screenshot={path.resolve()}", url],
                       capture_output=True, timeout=120, check=True)
    return path
