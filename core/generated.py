"""Files generated from code and checked in (the dashboards and alert rules, the CRDs): every
generator writes them, or with `--check` says which checked-in copies are stale, the same way."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path


def stale(files: Mapping[Path, str], root: Path) -> list[Path]:
    """The paths in `files` (relative to `root`) whose checked-in copy is missing or differs."""
    return [p for p, text in files.items() if not (root / p).exists() or (root / p).read_text() != text]


def generator_main(prog: str, description: str | None, files: Callable[[], Mapping[Path, str]], root: Path,
                   argv: list[str] | None = None) -> int:
    """`prog [--check]`: write `files()` (path relative to `root` → text), or exit 1 naming the
    stale ones."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--check", action="store_true", help="exit 1 if a checked-in file differs from its source")
    args = parser.parse_args(argv)
    want = files()
    if args.check:
        old = stale(want, root)
        for p in old:
            print(f"stale: {p} (run {prog})", file=sys.stderr)
        return 1 if old else 0
    for p, text in want.items():
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text(text)
        print(f"wrote {p}")
    return 0
