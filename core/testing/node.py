"""A real Kubernetes node on this host for the harness's ``node`` mode: containerd (with Debian's
runc), a kubelet and kube-proxy, pods on a CNI bridge, the kvpilot image imported into containerd
without a registry, and fake ``nvidia.com/gpu`` capacity patched onto the node's status.

Needs root. Every address is in 198.18.0.0/15 (set aside for benchmarking, never routed): pods get
198.18.0.0/16 on the bridge ``kvpcni0``, Services 198.19.0.0/24, and the node (and the apiserver,
so pods reach it through the ``kubernetes`` Service) 198.19.255.1 on an empty bridge ``kvpnode0``
(the kubelet refuses a loopback node IP and this kernel has no dummy links). Pods get no default
route, so they reach nothing outside those ranges.

Tear-down matters more than start-up: CI runs the rest of the suite on this machine afterwards. It
kills every task through containerd, stops the daemons, unmounts what they mounted, deletes the
links, the iptables chains kube-proxy made, the kubelet's cgroups and the fixed host paths the
daemons create, restores ip_forward, and then `leftovers()` names anything still there.
Recipe and measurements: ../shared/guides/real-node.md. Binaries: scripts/build-node.sh.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kvpilot.procs import ManagedProcess, free_port, wait_for

NODE_NAME = "realnode"
NODE_IP = "198.19.255.1"
POD_CIDR = "198.18.0.0/16"
POD_GATEWAY = "198.18.0.1"
SERVICE_CIDR = "198.19.0.0/24"
SERVICE_IP = "198.19.0.1"       # the `kubernetes` Service: first address of SERVICE_CIDR
NODE_LINK, CNI_LINK = "kvpnode0", "kvpcni0"
PAUSE_IMAGE = "local.test/pause:1"
# Paths the kubelet and containerd create whatever their flags say; removed at tear-down when
# this node created them.
FIXED_PATHS = ("/var/lib/kubelet", "/var/lib/cni", "/var/log/containers", "/run/containerd", "/opt/containerd")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Host settings the bridge plugin (ip_forward) and the kubelet (its "kernel tunables") change:
# put back as they were.
SYSCTLS = ("net/ipv4/ip_forward", "vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
           "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")


def _sysctls() -> dict[str, str]:
    found = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            found[key] = (Path("/proc/sys") / key).read_text().strip()
    return found


def node_cache_dir() -> Path:
    """$KVPILOT_NODE_DIR, or what scripts/build-node.sh prints (it returns at once when warm)."""
    env = os.environ.get("KVPILOT_NODE_DIR")
    if env:
        return Path(env)
    script = Path(__file__).resolve().parents[2] / "scripts" / "build-node.sh"
    out = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=check)


def _links() -> set[str]:
    return {line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link", "show").stdout.splitlines()}


def _nft_tables() -> set[str]:
    out = _run("nft", "list", "tables", check=False)
    return {line.strip() for line in out.stdout.splitlines() if line.startswith("table ")}


def host_problems() -> list[str]:
    """Why a node cannot start here (empty when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root: containerd, runc and the kubelet need root")
    for tool in ("runc", "iptables", "nft", "ip"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is missing (scripts/build-node.sh installs it)")
    if problems:
        return problems
    taken = {NODE_LINK, CNI_LINK} & _links()
    if taken:
        problems.append(f"links {sorted(taken)} exist: another node harness runs, or one leaked")
    return problems


class RealNode:
    """One node: prepare_host() before the apiserver binds NODE_IP, start() after it is up,
    teardown() after the workloads no longer matter (it does not drain)."""

    def __init__(self, workdir: Path, pki: Path, api_server: str, admin_kubeconfig: Path,
                 cache: Path | None = None) -> None:
        self.dir = workdir
        self.pki = pki
        self.api_server = api_server
        self.admin_kubeconfig = admin_kubeconfig
        self.cache = cache or node_cache_dir()
        self.bin = self.cache / "bin"
        self.sock = self.dir / "containerd" / "containerd.sock"
        self.procs: dict[str, ManagedProcess] = {}
        self._before_paths = {p for p in FIXED_PATHS if os.path.lexists(p)}
        self._before_cgroups = {h for h in self._hierarchies() if (h / "kubepods").exists()}
        self._before_nft = _nft_tables() if shutil.which("nft") else set()
        self._before_links = _links()
        self._sysctls = _sysctls()
        self._host_prepared = False

    # -- start ----------------------------------------------------------------------------------
    def prepare_host(self) -> None:
        problems = host_problems()
        if problems:
            raise RuntimeError("cannot start a real node: " + "; ".join(problems))
        self._host_prepared = True
        _run("ip", "link", "add", NODE_LINK, "type", "bridge")
        _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", NODE_LINK)
        _run("ip", "link", "set", NODE_LINK, "up")

    def start(self, images: list[Path], timeout: float = 90) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._write_configs()
        # The unpacked images live in RAM: imports are faster, and tear-down is one unmount
        # instead of deleting tens of thousands of files (over a minute on a busy disk).
        _run("mount", "-t", "tmpfs", "-o", "mode=0700,size=8g", "kvpilot-node", str(self.dir / "containerd" / "root"))
        env = {"PATH": f"{self.bin}:{os.environ['PATH']}"}   # its own shim, not a Debian one
        ctrd = self._spawn("containerd", [str(self.bin / "containerd"), "--config", str(self.dir / "containerd.toml")],
                           env)
        wait_for(lambda: self._ctr("version").returncode == 0, timeout, "containerd", ctrd)
        for archive in [self.cache / "images" / "pause.tar", *images]:
            out = self._ctr("images", "import", str(archive))
            if out.returncode != 0:
                raise RuntimeError(f"importing {archive} failed: {out.stderr}")
        self._spawn("kubelet", [
            str(self.bin / "kubelet"), f"--config={self.dir / 'kubelet.yaml'}",
            f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}", f"--root-dir={self.dir / 'kubelet'}",
            f"--cert-dir={self.dir / 'kubelet-pki'}", f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}",
            "--v=1"], env)
        self._spawn("kube-proxy", [
            str(self.bin / "kube-proxy"), f"--kubeconfig={self.admin_kubeconfig}", f"--hostname-override={NODE_NAME}",
            f"--cluster-cidr={POD_CIDR}", "--proxy-mode=iptables",
            f"--metrics-bind-address=127.0.0.1:{free_port()}", f"--healthz-bind-address=127.0.0.1:{free_port()}",
            "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0", f"--nodeport-addresses={NODE_IP}/32"], env)

    def tag_image(self, image: str, tag: str) -> None:
        """Give an imported image a second name, as pushing it under a new tag would (no registry)."""
        out = self._ctr("images", "tag", "--force", image, tag)
        if out.returncode != 0:
            raise RuntimeError(f"tagging {image} as {tag} failed: {out.stderr}")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.dir / "logs" / f"{name}.log", env=env)
        self.procs[name] = proc
        return proc

    def _ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / "ctr"), "--address", str(self.sock), "-n", "k8s.io", *args],
                              capture_output=True, text=True, timeout=300)

    def _write_configs(self) -> None:
        d = self.dir
        for sub in ("containerd/root", "cni/net.d", "cni/ipam", "cdi", "kubelet", "kubelet-pki", "podlogs",
                    "volume-plugins", "opt", "runc"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        rt = "plugins.'io.containerd.cri.v1.runtime'"
        (d / "containerd.toml").write_text(f"""version = 3
root = "{d}/containerd/root"
state = "{d}/containerd/state"
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "{d}/opt"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"
[{rt}]
  enable_selinux = false
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  cdi_spec_dirs = ["{d}/cdi"]
  [{rt}.containerd]
    default_runtime_name = "runc"
    [{rt}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{rt}.containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc')}"
        Root = "{d}/runc"
        SystemdCgroup = false
  [{rt}.cni]
    bin_dirs = ["{self.cache / 'cni'}"]
    conf_dir = "{d}/cni/net.d"
    max_conf_num = 1
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins.'io.containerd.nri.v1.nri']
  disable = true
""")
        (d / "cni/net.d/10-kvpilot.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": "kvpilot-node",
            "plugins": [{"type": "bridge", "bridge": CNI_LINK, "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "dataDir": f"{d}/cni/ipam",
                                  "ranges": [[{"subnet": POD_CIDR, "gateway": POD_GATEWAY}]],
                                  "routes": [{"dst": "198.18.0.0/15"}]}}]}))
        (d / "kubelet.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": NODE_IP, "port": 10250, "readOnlyPort": 0, "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                               "x509": {"clientCAFile": str(self.pki / "ca.crt")}},
            "authorization": {"mode": "AlwaysAllow"},   # only CA-signed client certs get in at all
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.sock}", "imageServiceEndpoint": f"unix://{self.sock}",
            "podLogsDir": f"{d}/podlogs", "volumePluginDir": f"{d}/volume-plugins", "resolvConf": "",
            "makeIPTablesUtilChains": False, "registerNode": True, "serializeImagePulls": False,
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%", "imagefs.available": "2%"},
            "imageGCHighThresholdPercent": 99, "imageGCLowThresholdPercent": 98,
        }))
        (d / "kubelet.kubeconfig").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "node",
            "clusters": [{"name": "h", "cluster": {"server": self.api_server,
                                                    "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": "node", "user": {"client-certificate": str(self.pki / "kubelet.crt"),
                                                "client-key": str(self.pki / "kubelet.key")}}],
            "contexts": [{"name": "node", "context": {"cluster": "h", "user": "node"}}]}))

    # -- tear-down --------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Kubelet first (so nothing restarts), then every container and sandbox process (found
        by the kubelet's cgroups: exactly this node's), the daemons, mounts, links, kube-proxy's
        chains, cgroups and fixed paths. Steps and their seconds go to logs/teardown.log.
        Does nothing when prepare_host() refused (the links may be another live node's)."""
        if not self._host_prepared:
            return
        steps = [("stop kubelet and kube-proxy", self._stop_agents), ("kill pods", self._kill_pods),
                 ("stop containerd", self._stop_containerd), ("kill shims", self._kill_shims),
                 ("unmount", self._unmount), ("delete links", self._delete_links),
                 ("iptables and sysctls", self._restore_host), ("cgroups", self._remove_cgroups),
                 ("fixed paths", self._remove_fixed_paths)]
        log = []
        for what, step in steps:
            t = time.monotonic()
            try:
                step()
            finally:
                log.append(f"{what}: {time.monotonic() - t:.1f}s")
        self._host_prepared = False
        with contextlib.suppress(OSError):
            (self.dir / "logs").mkdir(parents=True, exist_ok=True)
            (self.dir / "logs" / "teardown.log").write_text("\n".join(log) + "\n")
        print("[real-node] tear-down: " + ", ".join(log), file=sys.stderr)

    def _stop_agents(self) -> None:
        for name in ("kubelet", "kube-proxy"):
            if name in self.procs:
                self.procs.pop(name).stop()

    def _pod_pids(self) -> set[int]:
        pids: set[int] = set()
        for h in self._hierarchies():
            top = h / "kubepods"
            if h in self._before_cgroups or not top.is_dir():
                continue
            for procs in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(x) for x in procs.read_text().split())
        return pids

    def _kill_pods(self) -> None:
        deadline = time.monotonic() + 15
        while (pids := self._pod_pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
            time.sleep(0.2)

    def _stop_containerd(self) -> None:
        if "containerd" in self.procs:
            self.procs.pop("containerd").stop()

    def _delete_links(self) -> None:
        for link in (CNI_LINK, NODE_LINK):
            if link in _links():
                _run("ip", "link", "del", link, check=False)

    def _restore_host(self) -> None:
        if not self._host_prepared:
            return
        self._clean_iptables()
        for key, value in self._sysctls.items():
            with contextlib.suppress(OSError):
                (Path("/proc/sys") / key).write_text(value)

    def _remove_fixed_paths(self) -> None:
        for path in FIXED_PATHS:
            if path not in self._before_paths:
                shutil.rmtree(path, ignore_errors=True)

    def _own_pids(self) -> list[int]:
        """Processes started from this node's binaries or naming its state directory (shims
        daemonize, so they are not in any group this harness started)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
                if str(self.sock) in cmd or cmd.startswith(str(self.bin) + "/"):
                    pids.append(int(proc.name))
        return pids

    def _kill_shims(self) -> None:
        for pid in self._own_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        deadline = time.monotonic() + 10
        while self._own_pids() and time.monotonic() < deadline:
            time.sleep(0.1)

    def _mounts(self) -> list[str]:
        targets = _run("findmnt", "-rn", "-o", "TARGET").stdout.splitlines()
        prefix = str(self.dir) + "/"
        return sorted({t for t in targets if t.startswith(prefix) or t == str(self.dir)}, reverse=True)

    def _unmount(self) -> None:
        for _ in range(3):   # a shared root-dir mount can hide others until it goes
            for target in self._mounts():
                _run("umount", target, check=False)
            if not self._mounts():
                return
        for target in self._mounts():
            _run("umount", "-l", target, check=False)

    def _clean_iptables(self) -> None:
        if (self.bin / "kube-proxy").exists():
            _run(str(self.bin / "kube-proxy"), "--cleanup", "--proxy-mode=iptables", check=False)
        for tool in ("iptables", "ip6tables"):
            for chain in ("INPUT", "OUTPUT"):
                while _run(tool, "-t", "filter", "-D", chain, "-j", "KUBE-FIREWALL", check=False).returncode == 0:
                    pass
            _run(tool, "-t", "filter", "-F", "KUBE-FIREWALL", check=False)
            _run(tool, "-t", "filter", "-X", "KUBE-FIREWALL", check=False)
        for table in _nft_tables() - self._before_nft:
            _run("nft", "delete", *table.split(), check=False)   # "table ip nat" as listed

    @staticmethod
    def _hierarchies() -> list[Path]:
        return [h for h in CGROUP_ROOT.iterdir() if h.is_dir() and not h.is_symlink()] if CGROUP_ROOT.exists() else []

    def _remove_cgroups(self) -> None:
        for h in self._hierarchies():
            top = h / "kubepods"
            if h in self._before_cgroups or not top.exists():
                continue
            for sub in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()

    def leftovers(self) -> list[str]:
        """What tear-down left behind: processes, mounts, links, KUBE-* chains, cgroups, paths."""
        found = [f"process {pid}" for pid in self._own_pids()]
        found += [f"mount {m}" for m in self._mounts()]
        found += [f"link {name}" for name in sorted(_links() - self._before_links)]
        for tool in ("iptables-save", "ip6tables-save"):
            if shutil.which(tool):
                found += [f"{tool}: {line}" for line in _run(tool, check=False).stdout.splitlines()
                          if "KUBE-" in line or "CNI-" in line]
        found += [f"nft {t}" for t in _nft_tables() - self._before_nft]
        found += [f"cgroup {h / 'kubepods'}" for h in self._hierarchies()
                  if h not in self._before_cgroups and (h / "kubepods").exists()]
        found += [f"sysctl {k}={v} (was {self._sysctls[k]})" for k, v in _sysctls().items()
                  if k in self._sysctls and v != self._sysctls[k]]
        found += [f"path {p}" for p in FIXED_PATHS if p not in self._before_paths and os.path.lexists(p)]
        return found
