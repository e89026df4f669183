"""What the README's "Installing on a cluster" tells a user to do, on a real kubelet with real
containers: `helm install` the chart with the kvpilot image → the operator runs →
`kubectl apply -f deploy/examples/simulator.yaml` → workers and routers run → the official `openai`
client streams a completion through the router's Service via `kubectl port-forward` →
`kubectl scale workerpool` grows a pool and the router sees the new worker → the operator pod is
killed and its replacement converges → `helm uninstall` removes what the chart made.
Under load (2 cores, load average 15-30) the module takes about 4.5 min, most of it the image
import and pod starts; the steps wait on state, never on time.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from openai import OpenAI

from kvpilot import __version__
from kvpilot.names import LABEL_COMPONENT, LABEL_SERVICE, pool_name
from kvpilot.procs import ManagedProcess, free_port, wait_for
from kvpilot.testing.k8s import REPO_ROOT, ControlPlane

# The module's first test also pays for the node (image import) and the install: minutes under load.
pytestmark = pytest.mark.timeout(600)

CHART = str(REPO_ROOT / "helm" / "kvpilot")
EXAMPLE = REPO_ROOT / "deploy" / "examples" / "simulator.yaml"
SERVICE, MODEL, NS, RELEASE = "sim-llama-8b", "llama-8b", "kvpilot-system", "kv"


def _json(plane: ControlPlane, *args: str) -> Any:
    out = plane.kubectl(*args, "-o", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _ready_pods(plane: ControlPlane, namespace: str, selector: str) -> list[dict[str, Any]]:
    pods = _json(plane, "get", "pods", "-n", namespace, "-l", selector)["items"]
    return [p for p in pods if p["metadata"].get("deletionTimestamp") is None
            and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]


def _wait_ready(plane: ControlPlane, namespace: str, selector: str, count: int, timeout: float = 120) -> None:
    def enough() -> bool:
        return len(_ready_pods(plane, namespace, selector)) >= count

    try:
        wait_for(enough, timeout, f"{count} Ready pods with {selector}")
    except TimeoutError:
        events = plane.kubectl("get", "events", "-A", "--sort-by=.lastTimestamp").stdout[-4000:]
        pods = plane.kubectl("get", "pods", "-A", "-o", "wide").stdout
        raise AssertionError(f"pods {selector} not Ready\n{pods}\n{events}") from None


@pytest.fixture(scope="module")
def release(k8s_node: ControlPlane) -> Iterator[ControlPlane]:
    """The chart installed with the image the node has (IfNotPresent: never pulled), `helm
    install --wait`ed as a user would."""
    out = k8s_node.helm("install", RELEASE, CHART, "--namespace", NS, "--create-namespace", "--wait",
                        "--timeout", "150s", "--set", "image.pullPolicy=Never")
    assert out.returncode == 0, out.stdout + out.stderr + k8s_node.kubectl("get", "pods", "-A", "-o", "wide").stdout
    yield k8s_node
    k8s_node.helm("uninstall", RELEASE, "--namespace", NS, "--wait")


@pytest.fixture
def port_forward(release: ControlPlane) -> Iterator[Callable[[str, int], int]]:
    started: list[ManagedProcess] = []

    def start(target: str, port: int) -> int:
        local = free_port()
        proc = ManagedProcess("port-forward", [str(release.bin / "kubectl"), "port-forward", "--address", "127.0.0.1",
                                               target, f"{local}:{port}"],
                              release.dir / "logs" / f"port-forward-{local}.log", env=release.env())
        started.append(proc)
        wait_for(lambda: "Forwarding from" in proc.log_path.read_text(), 30, "kubectl port-forward", proc)
        return local

    yield start
    for proc in started:
        proc.stop()


def test_operator_runs_as_a_real_container(release: ControlPlane) -> None:
    [pod] = _ready_pods(release, NS, f"app.kubernetes.io/instance={RELEASE},{LABEL_COMPONENT}=operator")
    [status] = pod["status"]["containerStatuses"]
    assert status["containerID"].startswith("containerd://") and status["ready"]
    assert status["image"].endswith(f"kvpilot/kvpilot:{__version__}")
    assert pod["status"]["podIP"].startswith("198.18.")
    assert pod["spec"]["nodeName"] == "realnode"


def test_simulator_example_streams_scales_survives_operator_kill_and_uninstalls(release: ControlPlane,
                                                         port_forward: Callable[[str, int], int]) -> None:
    t0 = time.monotonic()
    out = release.kubectl("apply", "-f", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    engines = f"{LABEL_SERVICE}={SERVICE},{LABEL_COMPONENT}=engine"
    routers = f"{LABEL_SERVICE}={SERVICE},{LABEL_COMPONENT}=router"
    _wait_ready(release, "default", engines, 3)   # 1 prefill + 2 decode
    _wait_ready(release, "default", routers, 1)
    print(f"simulator example Ready in {time.monotonic() - t0:.1f}s")

    svc = _json(release, "get", "service", f"{SERVICE}-router")
    local = port_forward(f"service/{SERVICE}-router", svc["spec"]["ports"][0]["port"])
    client = OpenAI(base_url=f"http://127.0.0.1:{local}/v1", api_key="unused", max_retries=5)
    stream = client.chat.completions.create(model=MODEL, stream=True, max_tokens=16,
                                            messages=[{"role": "user", "content": "Hello from a real node"}])
    chunks = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) > 1 and "".join(chunks).strip()

    decode = pool_name(SERVICE, "decode")
    out = release.kubectl("scale", "workerpool", decode, "--replicas=3")
    assert out.returncode == 0, out.stderr
    _wait_ready(release, "default", f"{engines},kvpilot.io/role=decode", 3)

    def router_sees_three() -> bool:   # from its /metrics, on the client port as Prometheus scrapes it
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return f'kvpilot_router_healthy_endpoints{{model="{MODEL}",role="decode"}} 3.0' in text

    wait_for(router_sees_three, 60, "the router to list 3 decode workers")

    # The operator pod is killed; once its replacement runs (and the old one is surely gone), a
    # child deleted behind its back comes back, and the completion streams again.
    operator = f"app.kubernetes.io/instance={RELEASE},{LABEL_COMPONENT}=operator"
    [old] = [p["metadata"]["name"] for p in _ready_pods(release, NS, operator)]
    out = release.kubectl("delete", "pod", "-n", NS, old, "--grace-period=0", "--force")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: [p["metadata"]["name"] for p in _ready_pods(release, NS, operator)] not in ([], [old]), 120,
             "a replacement operator pod Ready")
    out = release.kubectl("delete", "deployment", f"{SERVICE}-router", "--wait=true", "--timeout=60s")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: release.kubectl("get", "deployment", f"{SERVICE}-router").returncode == 0, 120,
             "the replacement operator to recreate the router Deployment")
    _wait_ready(release, "default", routers, 1)
    local = port_forward(f"service/{SERVICE}-router", svc["spec"]["ports"][0]["port"])
    client = OpenAI(base_url=f"http://127.0.0.1:{local}/v1", api_key="unused", max_retries=5)
    reply = client.completions.create(model=MODEL, prompt="again", max_tokens=8, stream=True)
    assert any(c.choices and c.choices[0].text for c in reply)

    # The user's own objects go with `kubectl delete`; the chart's with `helm uninstall`.
    out = release.kubectl("delete", "-f", str(EXAMPLE), "--wait=true", "--timeout=90s")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: not _json(release, "get", "pods", "-n", "default", "-l", f"{LABEL_SERVICE}={SERVICE}")["items"],
             90, "the example's pods to go")
    out = release.helm("uninstall", RELEASE, "--namespace", NS, "--wait", "--timeout", "90s")
    assert out.returncode == 0, out.stderr
    # `--wait` waits for the Deployments; their pods then take their grace period to go.
    kinds = "all,serviceaccounts,roles,rolebindings,configmaps,clusterroles,clusterrolebindings"

    def chart_objects() -> str:
        out = release.kubectl("get", kinds, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name")
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    try:
        wait_for(lambda: chart_objects() == "", 90, "everything the chart made to go")
    except TimeoutError:
        raise AssertionError(f"left after helm uninstall:\n{chart_objects()}") from None
