"""A real Kubernetes control plane on loopback: etcd, kube-apiserver and, in full mode,
kube-controller-manager, kube-scheduler and kwok fake GPU nodes.

Three modes:
- ``api``: etcd + kube-apiserver only. Starts in seconds; enough for CRDs, custom resources,
  watches and server-side validation. Deployments never get pods in this mode.
- ``full``: adds controller-manager, scheduler and kwok, so Deployments get pods that are
  scheduled onto fake nodes advertising ``nvidia.com/gpu`` and reach Running with 127.64.x IPs.
- ``node``: controller-manager, scheduler and one real node instead of kwok (containerd, kubelet,
  kube-proxy; `kvpilot.testing.node`): pods are real containers of images imported from OCI
  archives. Needs root; addresses move into 198.18.0.0/15, and the apiserver listens on the node
  IP so pods reach it through the ``kubernetes`` Service.

All addresses are loopback: pods get IPs from 127.64.0.0/16, Services from 127.200.0.0/24,
nodes report 127.0.1.x. Binaries come from `scripts/build-k8s-harness.sh` (Go modules, cached).
Run ``scripts/k8s-harness`` to start one by hand and poke at it with kubectl and helm.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any, Literal

from kvpilot.procs import ManagedProcess, free_port, tcp_open, wait_for
from kvpilot.testing import node as realnode

Mode = Literal["api", "full", "node"]
POD_CIDR = "127.64.0.1/16"
SERVICE_CIDR = "127.200.0.0/24"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-k8s-harness.sh"


def harness_bin_dir() -> Path:
    """Where the Go-built binaries are: $KVPILOT_K8S_BIN, or whatever the build script prints
    (it returns at once when the versioned cache is warm and builds otherwise)."""
    env = os.environ.get("KVPILOT_K8S_BIN")
    if env:
        return Path(env)
    if not BUILD_SCRIPT.exists():
        raise RuntimeError("set KVPILOT_K8S_BIN to the directory holding etcd, kube-apiserver, kwok, helm")
    out = subprocess.run(["bash", str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


KUBERAY_SCRIPT = REPO_ROOT / "scripts" / "kuberay-crds.sh"


def kuberay_crds_dir() -> Path:
    """KubeRay's CRD YAMLs (ray-operator v1.5.0's config/crd/bases): $KVPILOT_KUBERAY_CRDS, or what
    `scripts/kuberay-crds.sh` prints (a versioned cache filled from the Go module proxy)."""
    env = os.environ.get("KVPILOT_KUBERAY_CRDS")
    if env:
        return Path(env)
    out = subprocess.run(["bash", str(KUBERAY_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


KUBERAY_BUILD = REPO_ROOT / "scripts" / "build-kuberay-operator.sh"


def kuberay_operator_bin() -> Path:
    """KubeRay's operator (ray-operator v1.5.0, built from its Go module): $KVPILOT_KUBERAY_OPERATOR,
    or what `scripts/build-kuberay-operator.sh` prints (a versioned cache; builds when cold)."""
    env = os.environ.get("KVPILOT_KUBERAY_OPERATOR")
    if env:
        return Path(env)
    out = subprocess.run(["bash", str(KUBERAY_BUILD)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def pod_states(pods: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """Each pod's phase, node and conditions (with reason and message), for a failing test's
    message: was a pod unscheduled, scheduled but never Running (kwok's lag), or not Ready?"""
    return {p["metadata"]["name"]: (p["status"].get("phase"), p["spec"].get("nodeName"),
                                    [(c["type"], c["status"], c.get("reason"), c.get("message"))
                                     for c in p["status"].get("conditions", [])])
            for p in pods}


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def make_pki(pki: Path, node: bool = False) -> None:
    """A fresh CA, an apiserver serving cert for 127.0.0.1, an admin client cert in
    system:masters and a service-account key pair; for a real node also the node's and Service
    addresses in the serving cert, the kubelet's client cert (system:nodes, for the Node
    authorizer) and the apiserver's client cert for kubelets."""
    pki.mkdir(parents=True, exist_ok=True)
    ext = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
           "extendedKeyUsage={usage}\n{san}subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    san = "IP:127.0.0.1,DNS:localhost" + (f",IP:{realnode.NODE_IP},IP:{realnode.SERVICE_IP}" if node else "")
    (pki / "srv.ext").write_text(ext.format(usage="serverAuth", san=f"subjectAltName={san}\n"))
    (pki / "cli.ext").write_text(ext.format(usage="clientAuth", san=""))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650", "-subj", "/CN=kvpilot-harness-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=pki)
    certs = [("apiserver", "/CN=kube-apiserver", "srv.ext"), ("admin", "/O=system:masters/CN=harness-admin", "cli.ext")]
    if node:
        certs += [("kubelet", f"/O=system:nodes/CN=system:node:{realnode.NODE_NAME}", "cli.ext"),
                  ("apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", "cli.ext")]
    for name, subj, ext_file in certs:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj, "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=pki)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "3650", "-extfile", ext_file, "-out", f"{name}.crt", cwd=pki)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


class ControlPlane:
    def __init__(self, mode: Mode = "api", workdir: Path | None = None, bin_dir: Path | None = None,
                 images: list[Path] | None = None) -> None:
        """`images`: OCI archives imported into the real node's containerd (node mode)."""
        self.mode: Mode = mode
        self.host = realnode.NODE_IP if mode == "node" else "127.0.0.1"
        self.images = images or []
        self.node: realnode.RealNode | None = None
        self.bin = bin_dir or harness_bin_dir()
        self.dir = workdir or Path(tempfile.mkdtemp(prefix=f"kvpilot-k8s-{mode}-"))
        self.pki = self.dir / "pki"
        self.kubeconfig = self.dir / "admin.kubeconfig"
        self.api_port = free_port()
        self.procs: list[ManagedProcess] = []
        self._next_node_ip = 1

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.api_port}"

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 90) -> ControlPlane:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        make_pki(self.pki, node=self.mode == "node")
        if self.mode == "node":   # the apiserver binds the node IP, so the link comes first
            self.node = realnode.RealNode(self.dir / "node", self.pki, self.server, self.kubeconfig)
            self.node.prepare_host()
        etcd_port, peer_port = free_port(), free_port()
        etcd = self._spawn("etcd", [
            "--name", "h", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
            "--initial-cluster", f"h=http://127.0.0.1:{peer_port}",
            "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        wait_for(lambda: tcp_open("127.0.0.1", etcd_port), timeout, "etcd", etcd)
        disabled = "ServiceAccount,TaintNodesByCondition" if self.mode == "api" else "TaintNodesByCondition"
        p = self.pki
        if self.mode == "node":   # pods reach the apiserver through the `kubernetes` Service
            extra = [f"--service-cluster-ip-range={realnode.SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
                     f"--kubelet-client-certificate={p}/apiserver-kubelet-client.crt",
                     f"--kubelet-client-key={p}/apiserver-kubelet-client.key",
                     "--kubelet-preferred-address-types=InternalIP"]
        else:
            extra = [f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=RBAC",
                     "--endpoint-reconciler-type=none"]
        api = self._spawn("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{etcd_port}", f"--bind-address={self.host}",
            f"--secure-port={self.api_port}", f"--advertise-address={self.host}", *extra,
            f"--tls-cert-file={p}/apiserver.crt", f"--tls-private-key-file={p}/apiserver.key",
            f"--client-ca-file={p}/ca.crt", f"--service-account-issuer={self.server}",
            f"--service-account-key-file={p}/sa.pub", f"--service-account-signing-key-file={p}/sa.key",
            "--allow-privileged=true", f"--disable-admission-plugins={disabled}",
        ])
        self._write_kubeconfig()
        wait_for(self.ready, timeout, "kube-apiserver /readyz", api)
        if self.mode in ("full", "node"):
            self._start_full(timeout)

    def _start_full(self, timeout: float) -> None:
        k = str(self.kubeconfig)
        auth = [f"--kubeconfig={k}", f"--authentication-kubeconfig={k}", f"--authorization-kubeconfig={k}",
                "--bind-address=127.0.0.1", "--leader-elect=false"]
        # EndpointSlices reject loopback pod IPs, so on kwok these controllers would only log errors.
        controllers = "*" if self.mode == "node" else \
            "*,-endpoints-controller,-endpointslice-controller,-endpointslice-mirroring-controller"
        kcm = self._spawn("kube-controller-manager", [
            *auth, f"--secure-port={free_port()}",
            f"--service-account-private-key-file={self.pki}/sa.key", f"--root-ca-file={self.pki}/ca.crt",
            f"--controllers={controllers}",
        ])
        self._spawn("kube-scheduler", [*auth, f"--secure-port={free_port()}"])
        if self.node is not None:
            wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default").returncode == 0,
                     timeout, "the default service account (controller-manager)", kcm)
            self._start_node(self.node, timeout)
            return
        self._spawn("kwok", [
            f"--kubeconfig={k}", "--manage-all-nodes=true", f"--cidr={POD_CIDR}", "--node-ip=127.0.1.1",
            "--node-lease-duration-seconds=40",
        ])
        # ServiceAccount admission needs the namespace's default account before any pod is created.
        wait_for(lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default").returncode == 0,
                 timeout, "the default service account (controller-manager)", self.procs[-3])

    def _start_node(self, node: realnode.RealNode, timeout: float) -> None:
        """containerd (images imported), kubelet and kube-proxy; then the fake GPUs, patched onto
        the status once the node has registered (the kubelet keeps extended resources it does not
        manage)."""
        node.start(self.images, timeout)
        name = realnode.NODE_NAME
        wait_for(lambda: self._node_ready(name), timeout, f"node {name} Ready", node.procs["kubelet"])
        gpus = [{"op": "add", "path": f"/status/{f}/nvidia.com~1gpu", "value": "8"}
                for f in ("capacity", "allocatable")]
        out = self.kubectl("patch", "node", name, "--subresource=status", "--type=json", "-p", json.dumps(gpus))
        if out.returncode != 0:
            raise RuntimeError(f"patching GPUs onto {name} failed: {out.stderr}")
        self.kubectl("label", "node", name, "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.count=8")

    def stop(self) -> None:
        """The node first (kubelet before anything it could restart), then scheduler, KCM, kwok,
        apiserver and etcd."""
        t0 = time.monotonic()
        try:
            if self.node is not None:
                self.node.teardown()
        finally:
            t1 = time.monotonic()
            for proc in reversed(self.procs):
                proc.stop()
            self.procs.clear()
            if self.node is not None:
                print(f"[k8s-harness] node torn down in {t1 - t0:.1f}s, control plane stopped in "
                      f"{time.monotonic() - t1:.1f}s", file=sys.stderr)

    def cleanup(self) -> None:
        """Stop everything and remove the work directory; in node mode, fail loudly if the host is
        not as it was (anything left would skew every later test on this machine)."""
        self.stop()
        left = self.node.leftovers() if self.node is not None else []
        t = time.monotonic()
        if self.node is not None:   # containerd's snapshots: tens of thousands of files; rm is faster
            subprocess.run(["rm", "-rf", str(self.dir)], check=False, timeout=300)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.node is not None:
            print(f"[k8s-harness] removed {self.dir} in {time.monotonic() - t:.1f}s", file=sys.stderr)
        if left:
            raise RuntimeError("the real node left these behind: " + "; ".join(left))

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def restart(self, component: str, down_s: float = 1.0, hard: bool = True, timeout: float = 90) -> None:
        """Take one component (``etcd``, ``kube-apiserver``, ``kwok``, ...) down and bring it back
        with the same arguments, data and port, for fault tests: what its clients see is an outage
        of `down_s` seconds, not a new cluster. `hard`: SIGKILL (a crash: no graceful shutdown,
        watches cut mid-stream) rather than SIGTERM. Returns once the apiserver is ready again
        (its /readyz checks etcd too)."""
        index = next((i for i, p in enumerate(self.procs) if p.name == component), None)
        if index is None:
            raise ValueError(f"no {component} in this control plane: {[p.name for p in self.procs]}")
        old = self.procs[index]
        if hard and old.alive():
            os.killpg(old.pid, signal.SIGKILL)
            wait_for(lambda: not old.alive(), 10, f"{component} to die")
        old.stop()
        time.sleep(down_s)
        new = ManagedProcess(component, old.argv, old.log_path)
        self.procs[index] = new
        wait_for(self.ready, timeout, f"kube-apiserver /readyz after restarting {component}", new)

    # -- helpers ------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, [str(self.bin / name), *args], self.dir / "logs" / f"{name}.log")
        self.procs.append(proc)
        return proc

    def _write_kubeconfig(self) -> None:
        def b64(name: str) -> str:
            return base64.b64encode((self.pki / name).read_bytes()).decode()

        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "harness",
            "clusters": [{"name": "harness", "cluster": {"server": self.server,
                                                          "certificate-authority-data": b64("ca.crt")}}],
            "users": [{"name": "admin", "user": {"client-certificate-data": b64("admin.crt"),
                                                 "client-key-data": b64("admin.key")}}],
            "contexts": [{"name": "harness", "context": {"cluster": "harness", "user": "admin",
                                                         "namespace": "default"}}],
        }))

    def ready(self) -> bool:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        with urllib.request.urlopen(self.server + "/readyz", context=ctx, timeout=2) as resp:
            return bool(resp.status == 200)

    def env(self) -> dict[str, str]:
        """Environment for kubectl, helm and kopf subprocesses pointing at this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{self.bin}:{os.environ['PATH']}",
                "HELM_CACHE_HOME": str(self.dir / "helm" / "cache"),
                "HELM_CONFIG_HOME": str(self.dir / "helm" / "config"),
                "HELM_DATA_HOME": str(self.dir / "helm" / "data")}

    def kubectl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "kubectl"), *args], env=self.env(), input=input,
                              capture_output=True, text=True, timeout=60)

    def apply_until_first(self, namespace: str, docs: list[dict[str, Any]], kind: str) -> bool:
        """Apply `docs` as one List, then return once the first object of `kind` appears in
        `namespace` (False if the watch ended without one): for fault tests that strike while a
        controller is in the middle of a burst. The watch starts before the apply, so the first
        event cannot be missed."""
        watch = subprocess.Popen([str(self.bin / "kubectl"), "get", kind, "-n", namespace, "--watch", "-o", "name"],
                                 env=self.env(), stdout=subprocess.PIPE, text=True)
        try:
            out = self.kubectl("apply", "-n", namespace, "-f", "-",
                               input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
            if out.returncode != 0:
                raise RuntimeError(f"kubectl apply failed: {out.stderr}")
            return watch.stdout is not None and bool(watch.stdout.readline())
        finally:
            watch.kill()
            watch.wait()

    def helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "helm"), *args], env=self.env(), capture_output=True, text=True,
                              timeout=180)

    def add_gpu_nodes(self, count: int, gpus: int = 8, product: str = "NVIDIA-H100-80GB-HBM3",
                      prefix: str = "gpu-node") -> list[str]:
        """Create kwok-managed nodes advertising `gpus` × nvidia.com/gpu (full mode only); with
        `gpus=0`, CPU nodes: no nvidia.com/gpu and no GPU labels."""
        if self.mode != "full":
            raise RuntimeError("fake nodes need the full control plane (kwok and the scheduler)")
        names, docs = [], []
        for _ in range(count):
            i = self._next_node_ip
            self._next_node_ip += 1
            name = f"{prefix}-{i}"
            names.append(name)
            capacity = {"cpu": "64", "memory": "512Gi", "pods": "110",
                        **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
            gpu_labels = {"nvidia.com/gpu.product": product, "nvidia.com/gpu.count": str(gpus)} if gpus else {}
            docs.append({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
                             "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                                        "kubernetes.io/os": "linux", **gpu_labels}},
                "spec": {},
                "status": {"addresses": [{"type": "InternalIP", "address": f"127.0.1.{i}"}],
                           "capacity": capacity, "allocatable": capacity},
            })
        out = self.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                   "items": docs}))
        if out.returncode != 0:
            raise RuntimeError(f"creating nodes failed: {out.stderr}")
        wait_for(lambda: all(self._node_ready(n) for n in names), 60, f"nodes {names} Ready (kwok)",
                 self.procs[-1])
        return names

    def _node_ready(self, name: str) -> bool:
        out = self.kubectl("get", "node", name, "-o",
                           "jsonpath={.status.conditions[?(@.type=='Ready')].status}")
        return out.stdout.strip() == "True"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="k8s-harness", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mode", choices=["api", "full", "node"], default="full")
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="node mode: an OCI archive to import into the node's containerd (repeatable; "
                             "default: $KVPILOT_IMAGE_ARCHIVE when set)")
    parser.add_argument("--gpu-nodes", type=int, default=2, help="kwok GPU nodes to create (full mode)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--dir", type=Path, help="work directory (default: a new temp dir, removed on exit)")
    args = parser.parse_args(argv)
    images = args.image or ([Path(os.environ["KVPILOT_IMAGE_ARCHIVE"])] if os.environ.get("KVPILOT_IMAGE_ARCHIVE")
                            else [])
    plane = ControlPlane(args.mode, workdir=args.dir, images=images)
    plane.start()
    if args.mode == "full" and args.gpu_nodes:
        plane.add_gpu_nodes(args.gpu_nodes, args.gpus_per_node)
    # Block only now: children inherit the signal mask, and they must still die on SIGTERM.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    node_logs = f"\n  node (containerd, kubelet, kube-proxy) logs in {plane.node.dir / 'logs'}" if plane.node else ""
    print(textwrap.dedent(f"""\
        control plane ({args.mode}) is up at {plane.server}; logs in {plane.dir / 'logs'}
          export KUBECONFIG={plane.kubeconfig}
          export PATH={plane.bin}:$PATH   # kubectl, helm, kwok{node_logs}
        Ctrl-C stops it and removes {plane.dir}."""), flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        if args.dir is None:
            plane.cleanup()
        else:
            plane.stop()
            left = plane.node.leftovers() if plane.node is not None else []
            if left:
                print("the real node left these behind: " + "; ".join(left), file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
