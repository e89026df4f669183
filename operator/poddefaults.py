"""What the operator adds to every pod it makes, beyond what one LLMService asks for: the platform
team's pull secrets, priority class, extra volumes and model-weight cache (chart values), and the
spread of a set of replicas over nodes and zones. Pure: render.py calls it on the pods it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

# Where the optional model-weight cache is mounted; HF_HOME points there, so vLLM (weights) and the
# router (tokenizers) read what an earlier pod downloaded instead of fetching the model again.
HF_CACHE_PATH = "/var/cache/huggingface"


@dataclass(frozen=True)
class PodDefaults:
    """What the platform team sets once for every pod the operator makes (chart values, passed to the
    operator as `--pod-defaults` JSON): pull secrets, a priority class, extra volumes mounted into
    engines and routers, and a model-weight cache (a PVC or a host path) for vLLM engines and their
    routers. Empty by default: the pods are then exactly what the LLMService alone asks for."""

    image_pull_secrets: tuple[str, ...] = ()
    priority_class_name: str | None = None
    volumes: tuple[Obj, ...] = ()
    volume_mounts: tuple[Obj, ...] = ()
    model_cache: Obj | None = None  # {"persistentVolumeClaim": {"claimName": ...}} or {"hostPath": {...}}

    @classmethod
    def parse(cls, raw: Obj | None) -> PodDefaults:
        """From the chart's JSON (camelCase keys, as in values.yaml's `workloads` block)."""
        raw = raw or {}
        cache = raw.get("modelCache") or {}
        source: Obj | None = None
        if cache.get("existingClaim"):
            source = {"persistentVolumeClaim": {"claimName": str(cache["existingClaim"])}}
        elif cache.get("hostPath"):
            source = {"hostPath": {"path": str(cache["hostPath"]), "type": "DirectoryOrCreate"}}
        secrets = tuple(str(s["name"] if isinstance(s, dict) else s) for s in raw.get("imagePullSecrets") or ())
        return cls(image_pull_secrets=secrets,
                   priority_class_name=raw.get("priorityClassName") or None,
                   volumes=tuple(raw.get("extraVolumes") or ()),
                   volume_mounts=tuple(raw.get("extraVolumeMounts") or ()),
                   model_cache=source)

    def apply(self, pod: Obj, container: Obj, cache: bool) -> None:
        """Add these defaults to a pod spec and its one container, in place; `cache`: mount the
        model-weight cache (only pods that read Hugging Face models: vLLM engines and their routers)."""
        if self.image_pull_secrets:
            pod["imagePullSecrets"] = [{"name": s} for s in self.image_pull_secrets]
        if self.priority_class_name:
            pod["priorityClassName"] = self.priority_class_name
        volumes = [*pod.get("volumes", []), *self.volumes]
        mounts = [*container.get("volumeMounts", []), *self.volume_mounts]
        if cache and self.model_cache is not None:
            volumes.append({"name": "model-cache", **self.model_cache})
            mounts.append({"name": "model-cache", "mountPath": HF_CACHE_PATH})
            container["env"] = [e for e in container.get("env", []) if e["name"] != "HF_HOME"] + [
                {"name": "HF_HOME", "value": HF_CACHE_PATH}]
        if volumes:
            pod["volumes"] = volumes
        if mounts:
            container["volumeMounts"] = mounts


NO_DEFAULTS = PodDefaults()


def spread(selector: dict[str, str]) -> list[Obj]:
    """Replicas on different nodes, then zones, where the cluster has them; never a reason to stay
    Pending (ScheduleAnyway): a one-node cluster still runs every replica."""
    return [{"maxSkew": 1, "topologyKey": key, "whenUnsatisfiable": "ScheduleAnyway",
             "labelSelector": {"matchLabels": selector}}
            for key in ("kubernetes.io/hostname", "topology.kubernetes.io/zone")]
