"""`kvpilot bench NAME [ARGS…]`: the recorded benchmarks (bench/*.py in a clone), by name.

Each benchmark is a script with its own --help; this entry point finds it next to the package
source and runs it in this interpreter, so `kvpilot bench autoscale --workload diurnal` is the same
as `python -P bench/autoscale.py --workload diurnal`. Results are recorded in bench/results/.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1] / "bench"


def available() -> dict[str, Path]:
    return {p.stem.replace("_", "-"): p for p in sorted(BENCH.glob("*.py"))} if BENCH.is_dir() else {}


def register(sub: Any) -> None:
    names = ", ".join(available()) or "none found (run from a clone)"
    bench = sub.add_parser("bench", help="run a recorded benchmark by name", description=f"benchmarks: {names}")
    bench.add_argument("name", nargs="?", help="benchmark name; omit to list them")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark (see its --help)")
    bench.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    benches = available()
    if not args.name:
        for name, script in benches.items():
            print(f"{name:20} {_summary(script)}")
        return 0
    path = benches.get(args.name)
    if path is None:
        print(f"unknown benchmark {args.name!r}; known: {', '.join(benches)}", file=sys.stderr)
        return 2
    sys.argv = [str(path), *args.args]
    runpy.run_path(str(path), run_name="__main__")
    return 0


def _summary(path: Path) -> str:
    """The first line of the script's docstring."""
    parts = path.read_text().split('"""')
    return parts[1].strip().splitlines()[0] if len(parts) > 2 and parts[1].strip() else ""
