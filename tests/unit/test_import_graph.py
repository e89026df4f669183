"""The direction of imports between components, stated once, so a new wrong arrow fails here
rather than in a review: shared names live in core, the transport knows no policy, the operator
knows no engine, the autoscaler no router module. The simulator is the one component allowed to
import the others' pure cores: its virtual-time clusters run the router's real policy objects and
the autoscaler's real planner, and so is the Ray Serve shell (`kvpilot.ray`), which runs the router's
policies and the simulator's engine inside Ray. Only `kvpilot.ray` imports Ray itself. Lazy imports
(inside functions) count: they are arrows too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"core": "kvpilot", "operator": "kvpilot.operator", "router": "kvpilot.router",
           "autoscaler": "kvpilot.autoscaler", "kvtransfer": "kvpilot.kvtransfer", "sim": "kvpilot.sim",
           "rayserve": "kvpilot.ray"}
# Top-level modules in core/ that wire components together (entry points, the local control plane,
# test fixtures) may import anything; the rest of core is shared types and names.
APPS = {"kvpilot.cli", "kvpilot.local", "kvpilot.local_cli", "kvpilot.local_monitoring", "kvpilot.demo",
        "kvpilot.bench_cli", "kvpilot.plots", "kvpilot.testing", "kvpilot.dashboards.screenshots"}
ALLOWED = {
    "core": {"core"},
    "kvtransfer": {"core", "kvtransfer"},
    "router": {"core", "kvtransfer", "router"},
    "autoscaler": {"core", "autoscaler"},
    "operator": {"core", "operator"},
    "sim": {"core", "kvtransfer", "router", "autoscaler", "sim"},
    "rayserve": {"core", "kvtransfer", "router", "sim", "rayserve"},
}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def component(module: str) -> str:
    if any(module == app or module.startswith(app + ".") for app in APPS):
        return "app"
    for folder, package in sorted(FOLDERS.items(), key=lambda kv: -len(kv[1])):
        if folder != "core" and (module == package or module.startswith(package + ".")):
            return folder
    return "core"


def imports(path: Path, prefix: str = "kvpilot") -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == prefix or a.name.startswith(prefix + ".")}
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module == prefix or node.module.startswith(prefix + ".")):
            found.add(node.module)
    return found


MODULES = _modules()


def test_every_component_folder_is_found() -> None:
    assert {component(m) for m in MODULES} == {*FOLDERS, "app"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if component(m) != "app"))
def test_imports_point_the_allowed_way(module: str) -> None:
    src = component(module)
    wrong = sorted(t for t in imports(MODULES[module]) if component(t) not in ALLOWED[src])
    assert not wrong, f"{module} ({src}) imports {wrong}; {src} may import only {sorted(ALLOWED[src])}"


def test_no_import_cycles() -> None:
    graph = {m: {t for t in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t):], t])
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_only_the_ray_package_imports_ray() -> None:
    """Ray is an extra (`kvpilot[ray]`): every other module must import without it."""
    wrong = sorted(m for m, p in MODULES.items() if component(m) != "rayserve" and imports(p, "ray"))
    assert not wrong, f"{wrong} import ray; only kvpilot.ray may"


def test_the_ray_adapter_core_imports_no_ray() -> None:
    """The mapping from Ray's signals to a policy is tested without Ray: it must stay free of it."""
    for module in ("kvpilot.ray.adapter", "kvpilot.ray.prompt"):
        assert not imports(MODULES[module], "ray"), module
