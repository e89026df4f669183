"""What the README's "Installing on a cluster" tells a user to do, on a real kubelet with real
containers: `helm install` the chart with the kvpilot image → the operator runs →
`kubectl apply -f deploy/examples/simulator.yaml` → workers and routers run → the official `openai`
client streams a completion through the router's Service via `kubectl port-forward` →
`kubectl scale workerpool` grows a pool and the router sees the new worker → the operator pod is
killed and its replacement converges → `helm uninstall` removes what the chart made. Before that,
two `helm upgrade`s: one of operator values only (a log level, a memory limit) rolls the
operator alone while a stream is served, and one of the image tag rolls every kvpilot pod to it.
On 2 cores the module takes about 5 min (8.5 min under load, load average 15-30), most of it the
image import, pod starts and the workers' 20 s drain; the two upgrades are 1.5 and 1.3 min of it
(2.3 and 3 min under load). The steps wait on state, never on time.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
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


def _pods(plane: ControlPlane, selector: str) -> dict[str, tuple[str, int]]:
    """name → (uid, restarts) of the live pods with `selector` in `default`."""
    pods = _json(plane, "get", "pods", "-n", "default", "-l", selector)["items"]
    return {p["metadata"]["name"]: (p["metadata"]["uid"], sum(c["restartCount"] for c in p["status"].get(
        "containerStatuses", []))) for p in pods if p["metadata"].get("deletionTimestamp") is None}


def _generations(plane: ControlPlane) -> dict[str, int]:
    deps = _json(plane, "get", "deployments", "-n", "default", "-l", f"{LABEL_SERVICE}={SERVICE}")["items"]
    return {d["metadata"]["name"]: d["metadata"]["generation"] for d in deps}


def _example_running(plane: ControlPlane) -> tuple[str, str]:
    """The example applied and all its pods Ready (a no-op when an earlier test did it); the
    selectors of its engine and router pods."""
    out = plane.kubectl("apply", "-f", str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    engines = f"{LABEL_SERVICE}={SERVICE},{LABEL_COMPONENT}=engine"
    routers = f"{LABEL_SERVICE}={SERVICE},{LABEL_COMPONENT}=router"
    wait_for(lambda: _json(plane, "get", "llmservice", SERVICE).get("status", {}).get("phase") == "Ready", 180,
             "the example LLMService Ready")
    deps = _json(plane, "get", "deployments", "-n", "default", "-l", f"{LABEL_SERVICE}={SERVICE}")["items"]
    for dep in deps:   # rolled out: no pod of an older ReplicaSet still going
        selector = ",".join(f"{k}={v}" for k, v in dep["spec"]["selector"]["matchLabels"].items())
        count = dep["spec"]["replicas"]
        _wait_ready(plane, "default", selector, count, timeout=180)
        wait_for(lambda sel=selector, n=count: len(_json(plane, "get", "pods", "-l", sel)["items"]) == n, 120,
                 f"only the {count} current pods of {dep['metadata']['name']}")
    return engines, routers


class _Stream(threading.Thread):
    """One long streamed completion through the router, each chunk's arrival time kept."""

    def __init__(self, local: int, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.client = OpenAI(base_url=f"http://127.0.0.1:{local}/v1", api_key="unused", max_retries=0, timeout=300)
        self.max_tokens = max_tokens
        self.times: list[float] = []
        self.finish: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for chunk in self.client.completions.create(model=MODEL, prompt="a long answer, please",
                                                        max_tokens=self.max_tokens, stream=True):
                if chunk.choices and chunk.choices[0].text:
                    self.times.append(time.time())
                if chunk.choices and chunk.choices[0].finish_reason:
                    self.finish = chunk.choices[0].finish_reason
        except BaseException as err:   # handed to the test thread
            self.error = err


def _started_at(pod: dict[str, Any]) -> float:
    [status] = pod["status"]["containerStatuses"]
    return datetime.strptime(status["state"]["running"]["startedAt"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=UTC).timestamp()


def test_helm_upgrade_of_operator_values_rolls_only_the_operator(release: ControlPlane,
                                                                 port_forward: Callable[[str, int], int]) -> None:
    """A log level and a memory limit changed: a new operator pod, and not one worker or router
    pod replaced or restarted, their Deployments not even re-rendered; a stream through the router
    is served while the operator rolls, and a new one after."""
    engines, routers = _example_running(release)
    workers_before, generations = _pods(release, f"{engines}"), _generations(release)
    routers_before = _pods(release, routers)
    operator = f"app.kubernetes.io/instance={RELEASE},{LABEL_COMPONENT}=operator"
    [old] = _ready_pods(release, NS, operator)
    svc = _json(release, "get", "service", f"{SERVICE}-router")
    local = port_forward(f"service/{SERVICE}-router", svc["spec"]["ports"][0]["port"])
    stream = _Stream(local, max_tokens=6000)   # about 40 s at the profile's 6.6 ms a token
    stream.start()
    wait_for(lambda: bool(stream.times) or not stream.is_alive(), 60, "the stream's first token")
    t0 = time.time()   # a limit, not a request: the node's CPUs are all requested while a router surges later
    out = release.helm("upgrade", RELEASE, CHART, "--namespace", NS, "--reuse-values", "--wait", "--timeout", "150s",
                       "--set", "logLevel=DEBUG", "--set", "resources.limits.memory=640Mi")
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"helm upgrade of operator values took {time.time() - t0:.1f}s")
    [new] = _ready_pods(release, NS, operator)
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    [container] = new["spec"]["containers"]
    assert "--log-level=DEBUG" in container["args"] and container["resources"]["limits"]["memory"] == "640Mi"
    stream.join(120)
    assert stream.error is None and not stream.is_alive(), stream.error
    assert stream.finish == "length" and len(stream.times) > 100   # the whole answer, in many chunks
    assert stream.times[0] < t0 and stream.times[-1] > _started_at(new), \
        "the stream ended before the new operator started: make it longer"
    # The new operator has resumed the service (kopf's resume handler reconciles it) and left it alone.
    wait_for(lambda: "Handler 'llmservice-resume' succeeded" in release.kubectl(
        "logs", "-n", NS, new["metadata"]["name"]).stdout, 90, "the new operator to resume the LLMService")
    assert _pods(release, engines) == workers_before and _pods(release, routers) == routers_before
    assert _generations(release) == generations
    client = OpenAI(base_url=f"http://127.0.0.1:{local}/v1", api_key="unused", max_retries=2)
    reply = client.completions.create(model=MODEL, prompt="after the upgrade", max_tokens=8, stream=True)
    assert any(c.choices and c.choices[0].text for c in reply)


def test_helm_upgrade_to_a_new_image_tag_rolls_routers_and_simulators_to_it(
        release: ControlPlane, port_forward: Callable[[str, int], int]) -> None:
    """The image is the kvpilot command: the operator, its routers and its simulator workers all run
    it, so a new tag reaches them all (vLLM workers' image is their spec's: unit test_render)."""
    engines, routers = _example_running(release)
    before = set(_pods(release, engines)) | set(_pods(release, routers))
    image = f"ghcr.io/kvpilot/kvpilot:{__version__}"
    tag = f"{__version__}-retagged"
    assert release.node is not None
    release.node.tag_image(image, f"ghcr.io/kvpilot/kvpilot:{tag}")
    t0 = time.time()
    out = release.helm("upgrade", RELEASE, CHART, "--namespace", NS, "--reuse-values", "--wait", "--timeout", "150s",
                       "--set", f"image.tag={tag}")
    assert out.returncode == 0, out.stdout + out.stderr

    def images() -> dict[str, str]:
        pods = _json(release, "get", "pods", "-A", "-l", "app.kubernetes.io/name=kvpilot")["items"]
        return {p["metadata"]["name"]: c["image"] for p in pods for c in p["spec"]["containers"]}

    try:
        wait_for(lambda: set(images().values()) == {f"ghcr.io/kvpilot/kvpilot:{tag}"}, 300,
                 "every kvpilot pod on the new tag")
    except TimeoutError:
        pods = release.kubectl("get", "pods", "-A", "-o", "wide").stdout
        raise AssertionError(f"not all on {tag}: {images()}\n{pods}") from None
    _example_running(release)
    print(f"helm upgrade of the image tag rolled everything in {time.time() - t0:.1f}s")
    assert not before & (set(_pods(release, engines)) | set(_pods(release, routers)))
    svc = _json(release, "get", "service", f"{SERVICE}-router")
    local = port_forward(f"service/{SERVICE}-router", svc["spec"]["ports"][0]["port"])
    client = OpenAI(base_url=f"http://127.0.0.1:{local}/v1", api_key="unused", max_retries=5)
    reply = client.completions.create(model=MODEL, prompt="on the new tag", max_tokens=8, stream=True)
    assert any(c.choices and c.choices[0].text for c in reply)


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
