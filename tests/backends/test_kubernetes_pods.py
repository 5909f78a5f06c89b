"""The Kubernetes backend's pure half: manifests and Pod status (no lightkube, no API server)."""

from __future__ import annotations

from typing import Any

from flame_asgi._base.parent import ParentInfo
from flame_asgi.backends._base import RunnerSpec
from flame_asgi.backends._kubernetes_pods import (
    describe_end,
    labels,
    pod_manifest,
    pod_progress,
    runner_name,
    secret_manifest,
    source_container,
)

PARENT = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "uid": "u-1"}, "spec": {
    "serviceAccountName": "web", "affinity": {"podAntiAffinity": {}},
    "volumes": [{"name": "conf", "configMap": {"name": "c"}}, {"name": "data", "persistentVolumeClaim": {}},
                {"name": "kube-api-access-x", "projected": {}}],
    "containers": [{"name": "app", "image": "app:1", "env": [{"name": "DB", "value": "pg"}],
                    "volumeMounts": [{"name": "conf", "mountPath": "/c"}, {"name": "data", "mountPath": "/d"}]}]}}


def spec_for(runner_id: str = "Pool_1.ABC") -> RunnerSpec:
    info = ParentInfo(pool="pool", runner_id=runner_id, parent_address="here", backend="kubernetes",
                      code_version="v", app="m:app")
    return RunnerSpec(pool="pool", runner_id=runner_id, info=info, app="m:app", boot_timeout=5, secret="s")


def test_the_runner_pod_is_the_parents_pod_made_a_runner() -> None:
    spec = spec_for()
    source = source_container(PARENT["spec"], None)
    assert source is not None and source_container(PARENT["spec"], "nope") is None
    pod = pod_manifest(spec, PARENT, source, namespace="ns", labels=labels(spec, "web-1", "b1"),
                       command=["python", "-m", "uvicorn"], env={"FLAME_MAX_PAYLOAD": "1048576"}, port=8000,
                       image=None, cpu="500m", memory=None, stop_timeout=1.5, template=None)
    meta, pod_spec = pod["metadata"], pod["spec"]
    assert meta["name"] == runner_name(spec.runner_id) == "flame-pool-1-abc"
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "web-1", "uid": "u-1",
                                        "controller": True}]
    assert pod_spec["serviceAccountName"] == "web" and "affinity" not in pod_spec
    assert pod_spec["restartPolicy"] == "Never" and pod_spec["terminationGracePeriodSeconds"] == 2  # rounded up
    assert [v["name"] for v in pod_spec["volumes"]] == ["conf"]  # configuration only, not storage or tokens
    [container] = pod_spec["containers"]
    assert container["volumeMounts"] == [{"name": "conf", "mountPath": "/c"}]
    env = {e["name"]: e for e in container["env"]}
    assert env["DB"]["value"] == "pg" and env["FLAME_MAX_PAYLOAD"]["value"] == "1048576"
    # The runner's keys and FLAME_PARENT come from the runner's Secret, never the Pod spec;
    # the parent's root secret goes nowhere.
    assert env["FLAME_RUNNER_KEYS"] == {"name": "FLAME_RUNNER_KEYS", "valueFrom": {"secretKeyRef": {
        "name": "flame-pool-1-abc", "key": "FLAME_RUNNER_KEYS"}}}
    # The parent's root secret never reaches a runner: blanked, so it also wins over envFrom.
    assert env["FLAME_SECRET"] == {"name": "FLAME_SECRET", "value": ""}
    assert container["resources"] == {"requests": {"cpu": "500m"}, "limits": {"cpu": "500m"}}
    secret = secret_manifest(spec, PARENT, "ns", labels(spec, "web-1", "b1"))
    assert secret["stringData"] == spec.env and secret["metadata"]["name"] == "flame-pool-1-abc"


def _pod(status: dict[str, Any], node: str | None = "n1") -> dict[str, Any]:
    return {"metadata": {"name": "p"}, "spec": {"nodeName": node} if node else {}, "status": status}


def test_pod_progress_says_whether_and_why_not_yet() -> None:
    assert pod_progress(_pod({"phase": "Running", "podIP": "10.0.0.5"})) == ("10.0.0.5", False, "running")
    pulling = _pod({"containerStatuses": [{"name": "runner", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off"}}}]})
    assert pod_progress(pulling) == (None, False, "ImagePullBackOff: Back-off")
    broken = _pod({"containerStatuses": [{"name": "runner", "state": {"waiting": {"reason": "InvalidImageName"}}}]})
    assert pod_progress(broken)[1] is True
    assert "not scheduled yet" in pod_progress(_pod({}, node=None))[2]
    # Short of CPU, a Pod may fit later; its host port taken everywhere, this boot never will.
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    short = _pod({"conditions": [{**unschedulable, "message": "0/1 nodes are available: 1 Insufficient cpu."}]})
    assert pod_progress(short) == (None, False, "Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.")
    taken = _pod({"conditions": [{**unschedulable, "message": "0/1 nodes are available: 1 node(s) didn't have "
                                                               "free ports for the requested pod ports."}]})
    assert pod_progress(taken)[1] is True
    ended = _pod({"phase": "Failed", "containerStatuses": [{"name": "runner", "state": {"terminated": {
        "exitCode": 137}}}]})
    assert pod_progress(ended) == (None, True, "runner pod p was killed by SIGKILL (exit code 137)")
    assert describe_end(ended, "p").kind == "signal" and describe_end(None, "p").kind == "gone"
