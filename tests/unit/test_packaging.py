"""What `pip install kvpilot` pulls: the base install serves no one component's heavy libraries, so
an operator-only image carries no plotting stack and a router-only install no Kubernetes operator
framework. Read from the installed distribution's own metadata, as pip reads it."""

from __future__ import annotations

import re
from importlib.metadata import requires

from packaging.requirements import Requirement


def _by_extra() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in requires("kvpilot") or []:
        req = Requirement(line)
        marker = str(req.marker or "")
        found = re.search(r'extra == "([^"]+)"', marker)
        out.setdefault(found.group(1) if found else "", set()).add(req.name.lower())
    return out


def test_base_install_has_no_plotting_kubernetes_or_kv_event_libraries() -> None:
    base = _by_extra()[""]
    assert {"pydantic", "aiohttp", "prometheus-client"} <= base
    assert not base & {"matplotlib", "kopf", "kubernetes", "numpy", "pyzmq", "msgpack", "redis", "ray"}


def test_each_component_extra_brings_what_it_imports() -> None:
    extras = _by_extra()
    assert "matplotlib" in extras["bench"]
    assert {"kopf", "kubernetes"} <= extras["operator"]
    assert {"kubernetes", "numpy", "redis"} <= extras["router"]
    assert {"pyzmq", "msgpack"} <= extras["kvevents"]
    assert "kubernetes" in extras["autoscaler"]


def test_ray_is_an_extra_pinned_to_one_release() -> None:
    """`ray.serve.request_router` is an alpha API: the extra pins the release kvpilot.ray is built on."""
    pins = [Requirement(line) for line in requires("kvpilot") or [] if Requirement(line).name.lower() == "ray"]
    assert pins, "no ray requirement"
    for req in pins:
        assert 'extra == "ray"' in str(req.marker)
        assert "serve" in req.extras
        assert str(req.specifier).startswith("==")
