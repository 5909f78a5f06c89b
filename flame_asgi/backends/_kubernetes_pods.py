"""Kubernetes without the API: the runner Pod and Secret manifests, and what a Pod's status
says (is it up, will it ever be, how did it end). Plain functions over dicts, tested
without lightkube or an API server; ``kubernetes.py`` does the API calls around them.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flame_asgi._base.settings import SECRET
from flame_asgi._wire.exits import ExitReason
from flame_asgi.backends._base import RunnerSpec
from flame_asgi.backends._toolkit import dns_name, graceful_seconds

LABEL_POOL, LABEL_RUNNER, LABEL_PARENT, LABEL_BACKEND = (
    "flame-asgi/pool", "flame-asgi/runner", "flame-asgi/parent", "flame-asgi/backend")
MANAGED_BY = {"app.kubernetes.io/managed-by": "flame_asgi"}
CONTAINER = "runner"
POD_IP = "FLAME_POD_IP"  # a host-network runner binds its node's address, from the downward API
# Pod-level fields a runner inherits. Not affinity (rules written for the parent's labels
# would repel its runners), nodeName, hostname, or anything the parent's controller owns.
POD_FIELDS = ("serviceAccountName", "automountServiceAccountToken", "imagePullSecrets", "nodeSelector",
              "tolerations", "securityContext", "priorityClassName", "runtimeClassName", "dnsPolicy", "dnsConfig",
              "enableServiceLinks")
CONTAINER_FIELDS = ("image", "imagePullPolicy", "workingDir", "envFrom", "resources", "securityContext")
# Volumes any Pod can mount alongside the parent: configuration, not storage.
PORTABLE_VOLUMES = ("configMap", "secret", "emptyDir", "downwardAPI", "projected")
FATAL_WAITING = frozenset({"InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
                           "CreateContainerError", "RunContainerError"})


def labels(spec: RunnerSpec, parent_pod: str, backend_id: str) -> dict[str, str]:
    return {**MANAGED_BY, LABEL_POOL: label(spec.pool), LABEL_RUNNER: label(spec.runner_id),
            LABEL_PARENT: label(parent_pod), LABEL_BACKEND: backend_id}


def secret_manifest(spec: RunnerSpec, parent: Mapping[str, Any], namespace: str,
                    labels: Mapping[str, str]) -> dict[str, Any]:
    # Owned by the parent Pod, like the runner Pod, and named like it. Owned by the runner
    # Pod, it would need a patch once that Pod exists, and `patch secrets` can read them all.
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "stringData": spec.env,
            "metadata": {"name": runner_name(spec.runner_id), "namespace": namespace,
                         "labels": dict(labels), "ownerReferences": [owner_reference(parent)]}}


def source_container(pod_spec: Mapping[str, Any], name: str | None) -> dict[str, Any] | None:
    """The parent Pod's container runners copy: ``name``, or the first one."""
    for c in pod_spec.get("containers") or []:
        if name is None or c.get("name") == name:
            return dict(c)
    return None


def pod_manifest(spec: RunnerSpec, parent: Mapping[str, Any], source: Mapping[str, Any], *, namespace: str,
                 labels: Mapping[str, str], command: Sequence[str], env: Mapping[str, str], port: int,
                 image: str | None, cpu: str | None, memory: str | None, stop_timeout: float,
                 template: Mapping[str, Any] | None, host_network: bool = False) -> dict[str, Any]:
    """The runner Pod for ``spec``: the parent's Pod (its ``source`` container) made a runner
    that runs ``command``, then ``template`` over it."""
    pod_spec: dict[str, Any] = parent.get("spec") or {}
    volumes = [v for v in pod_spec.get("volumes") or () if portable(v)]
    kept = {v["name"] for v in volumes}
    merged_env: dict[str, dict[str, Any]] = {e["name"]: e for e in source.get("env") or ()}
    # Never the parent's root secret: set empty, so it also wins over an envFrom source.
    merged_env[SECRET.name] = {"name": SECRET.name, "value": ""}
    merged_env.update({k: {"name": k, "value": v} for k, v in env.items()})
    secret = runner_name(spec.runner_id)
    merged_env.update({k: {"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}} for k in spec.env})
    if host_network:
        merged_env[POD_IP] = {"name": POD_IP, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    container: dict[str, Any] = {k: copy.deepcopy(source[k]) for k in CONTAINER_FIELDS if source.get(k)}
    if image and image != source.get("image"):
        container.pop("imagePullPolicy", None)
        container["image"] = image
    resources = container.setdefault("resources", {})
    for key, value in (("cpu", cpu), ("memory", memory)):
        if value is not None:
            resources.setdefault("requests", {})[key] = resources.setdefault("limits", {})[key] = value
    # On the node's network the container port is a host port: the scheduler then never
    # places two runners with the same port on one node.
    ports: dict[str, Any] = {"name": "flame", "containerPort": port}
    if host_network:
        ports["hostPort"] = port
    container.update(name=CONTAINER, command=list(command), env=list(merged_env.values()), ports=[ports],
                     volumeMounts=[m for m in source.get("volumeMounts") or () if m.get("name") in kept])
    manifest: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": secret, "namespace": namespace, "labels": dict(labels),
                     "ownerReferences": [owner_reference(parent, controller=True)]},
        "spec": {**{k: copy.deepcopy(pod_spec[k]) for k in POD_FIELDS if k in pod_spec},
                 "containers": [container], "volumes": volumes, "restartPolicy": "Never",
                 "terminationGracePeriodSeconds": graceful_seconds(stop_timeout)},
    }
    if host_network:  # cluster DNS still resolves for a host-network Pod with this policy
        manifest["spec"].update(hostNetwork=True, dnsPolicy="ClusterFirstWithHostNet")
    return merge_template(manifest, template)


# -- Pod status -------------------------------------------------------------------------------
def _runner_status(pod: Mapping[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == CONTAINER), statuses[0] if statuses else {})


def pod_ended(pod: Mapping[str, Any]) -> bool:
    state = _runner_status(pod).get("state") or {}
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") or "terminated" in state


def pod_progress(pod: Mapping[str, Any]) -> tuple[str | None, bool, str]:
    """``(ip, fatal, why)``: the Pod's IP once it runs; otherwise whether it never will, and why not yet."""
    status = pod.get("status") or {}
    if pod_ended(pod):
        return None, True, describe_end(pod, pod["metadata"]["name"]).detail
    waiting = (_runner_status(pod).get("state") or {}).get("waiting") or {}
    if waiting.get("reason"):
        why = f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
        return None, waiting["reason"] in FATAL_WAITING, why
    if status.get("phase") == "Running" and status.get("podIP"):
        return status["podIP"], False, "running"
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            message = cond.get("message") or ""
            # A host port taken on every node: the next boot draws another port.
            return (None, "free ports" in message,
                    f"{cond.get('reason') or 'unschedulable'}: {message}".rstrip(": "))
    if not (pod.get("spec") or {}).get("nodeName"):
        return None, False, "not scheduled yet (no node accepted it; is the scheduler running?)"
    return None, False, f"{status.get('phase') or 'Pending'} on node {pod['spec']['nodeName']}"


def describe_end(pod: Mapping[str, Any] | None, name: str) -> ExitReason:
    """How a runner Pod ended: OOM kill, signal, exit code, eviction, deletion."""
    subject = f"runner pod {name}"
    if pod is None:
        return ExitReason("gone", f"{subject} was deleted")
    status, cs = pod.get("status") or {}, _runner_status(pod)
    term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
    if term:
        code, reason = term.get("exitCode"), term.get("reason") or ""
        if reason == "OOMKilled":
            limit = ((pod.get("spec") or {}).get("containers") or [{}])[0].get("resources", {}).get("limits", {})
            mem = f" of {limit['memory']}" if limit.get("memory") else ""
            return ExitReason("oom", f"{subject} was killed: out of memory (OOMKilled, memory limit{mem})", code)
        sig = term.get("signal")
        if isinstance(sig, int) and sig in signal.valid_signals():
            name_ = signal.Signals(sig).name
            return ExitReason("signal", f"{subject} was killed by {name_} (exit code {code})", code, name_)
        if isinstance(code, int):
            ended = ExitReason.from_status(subject, code, shell_codes=True)
            if ended.kind == "exit":
                detail = f" ({reason}: {term['message']})" if term.get("message") else f" ({reason})" if reason else ""
                return ExitReason("exit", f"{ended.detail}{detail}", code)
            return ended
        return ExitReason("gone", f"{subject} terminated ({reason or 'no exit code'})")
    if status.get("reason"):  # Evicted, NodeLost, DeadlineExceeded...
        return ExitReason("gone", f"{subject} is {status.get('phase')}: {status['reason']}: "
                                  f"{status.get('message') or ''}")
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return ExitReason("gone", f"{subject} is being deleted")
    return ExitReason("unreachable", f"{subject} is {status.get('phase') or 'unknown'}")


# -- manifests ----------------------------------------------------------------------------
def owner_reference(obj: Mapping[str, Any], controller: bool = False) -> dict[str, Any]:
    meta = obj["metadata"]
    ref = {"apiVersion": obj.get("apiVersion", "v1"), "kind": obj.get("kind", "Pod"), "name": meta["name"],
           "uid": meta["uid"]}
    # A controller reference also keeps a ReplicaSet whose selector matches from adopting the Pod.
    return {**ref, "controller": True} if controller else ref


def portable(volume: Mapping[str, Any]) -> bool:
    # kube-api-access-*: the service account token volume, added to each Pod by admission.
    return any(k in volume for k in PORTABLE_VOLUMES) and not volume["name"].startswith("kube-api-access-")


def merge_template(base: dict[str, Any], template: Mapping[str, Any] | None) -> dict[str, Any]:
    if not template:
        return base
    over = copy.deepcopy(dict(template))
    spec = over.get("spec") or {}
    extra = spec.pop("containers", None) or []
    merged = _merge(base, over)
    if extra:
        containers = merged["spec"]["containers"]
        containers[0] = _merge(containers[0], extra[0])
        containers.extend(extra[1:])
    return merged


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_template(template: Mapping[str, Any] | str | Path | Any) -> dict[str, Any] | None:
    if template is None or isinstance(template, Mapping):
        return dict(template) if template else None
    if hasattr(template, "to_dict"):  # a lightkube Pod
        return dict(template.to_dict())
    text = Path(template).read_text()
    try:
        loaded = json.loads(text)
    except ValueError:
        yaml = importlib.import_module("yaml")  # lightkube depends on PyYAML
        loaded = yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"KubernetesBackend: template {template} is not a Pod manifest (a mapping)")
    return loaded


def runner_name(runner_id: str) -> str:
    return dns_name(runner_id)


def label(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:63].strip("-_.")
