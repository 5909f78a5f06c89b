"""KubernetesBackend without a cluster: the runner Pod it generates, how it describes a Pod's
end, its settings. On a real cluster: ``tests/backends/kubernetes/``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from flame_asgi._base.parent import ParentInfo
from flame_asgi.backends._base import RunnerSpec

pytest.importorskip("lightkube", reason="KubernetesBackend needs lightkube: pip install 'flame_asgi[kubernetes]'")

from flame_asgi.backends._kubernetes_pods import describe_end
from flame_asgi.backends.kubernetes import KubernetesBackend


# -- without a cluster ----------------------------------------------------------------------
def spec_for(runner_id: str = "pool-1-abc") -> RunnerSpec:
    info = ParentInfo(pool="pool", runner_id=runner_id, parent_address="here", backend="kubernetes",
                      code_version="v", app="m:app")
    return RunnerSpec(pool="pool", runner_id=runner_id, info=info, app="m:app", boot_timeout=5, secret="s")


def test_a_template_merges_over_the_generated_pod(tmp_path: Path) -> None:
    parent_pod = {"metadata": {"name": "web-1", "uid": "u-1"}, "spec": {
        "serviceAccountName": "web", "nodeSelector": {"pool": "web"}, "affinity": {"podAntiAffinity": {}},
        "containers": [{"name": "app", "image": "app:1", "resources": {"limits": {"memory": "1Gi"}}}]}}
    template = {"metadata": {"labels": {"team": "media"}}, "spec": {
        "nodeSelector": None, "priorityClassName": "batch",
        "containers": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}, {"name": "sidecar", "image": "s:1"}]}}
    b = KubernetesBackend(parent_pod="web-1", namespace="ns", memory="2Gi", template=template)
    pod = b.pod_manifest(spec_for(), parent_pod)
    assert pod["metadata"]["name"] == "flame-pool-1-abc" and pod["metadata"]["labels"]["team"] == "media"
    spec = pod["spec"]
    assert "nodeSelector" not in spec and "affinity" not in spec and spec["priorityClassName"] == "batch"
    assert [c["name"] for c in spec["containers"]] == ["runner", "sidecar"]
    assert spec["containers"][0]["resources"] == {"limits": {"memory": "2Gi", "nvidia.com/gpu": "1"},
                                                  "requests": {"memory": "2Gi"}}
    # A file works too (YAML or JSON), as FLAME_K8S_TEMPLATE gives it.
    (tmp_path / "runner.yaml").write_text("spec:\n  priorityClassName: batch\n")
    b = KubernetesBackend(parent_pod="web-1", namespace="ns", template=tmp_path / "runner.yaml")
    assert b.pod_manifest(spec_for(), parent_pod)["spec"]["priorityClassName"] == "batch"


def test_how_a_pod_ended_is_described() -> None:
    def ended(terminated: dict[str, Any], limits: dict[str, str] | None = None) -> dict[str, Any]:
        return {"spec": {"containers": [{"name": "runner", "resources": {"limits": limits or {}}}]},
                "status": {"phase": "Failed", "containerStatuses": [{"name": "runner",
                                                                     "state": {"terminated": terminated}}]}}
    assert str(describe_end(ended({"exitCode": 137, "reason": "OOMKilled"}, {"memory": "256Mi"}), "p")) == (
        "runner pod p was killed: out of memory (OOMKilled, memory limit of 256Mi)")
    assert str(describe_end(ended({"exitCode": 143, "reason": "Error"}), "p")) == (
        "runner pod p was killed by SIGTERM (exit code 143)")
    assert str(describe_end(ended({"exitCode": 3, "reason": "Error"}), "p")) == (
        "runner pod p exited with code 3 (Error)")
    evicted = {"status": {"phase": "Failed", "reason": "Evicted", "message": "low on memory"}}
    assert str(describe_end(evicted, "p")) == "runner pod p is Failed: Evicted: low on memory"
    assert str(describe_end(None, "p")) == "runner pod p was deleted"


def test_without_lightkube_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightkube", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'flame_asgi\[kubernetes\]'"):
        KubernetesBackend()


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "web-7f9c")
    monkeypatch.setenv("POD_NAMESPACE", "shop")
    b = KubernetesBackend.from_env({"FLAME_K8S_IMAGE": "app:7", "FLAME_K8S_CPU": "500m", "FLAME_K8S_MEMORY": "1Gi",
                                    "FLAME_K8S_PORT": "9000", "FLAME_K8S_APP": "svc.main:app"})
    assert (b.parent_pod, b.namespace, b.image, b.cpu, b.memory, b.port, b.app_import()) == (
        "web-7f9c", "shop", "app:7", "500m", "1Gi", 9000, "svc.main:app")
    b = KubernetesBackend.from_env({"FLAME_K8S_PARENT_POD": "other", "FLAME_K8S_NAMESPACE": "ns2"})
    assert (b.parent_pod, b.namespace) == ("other", "ns2")


def test_on_the_host_network_a_runner_binds_its_node_address_on_a_port_of_its_own() -> None:
    parent_pod = {"metadata": {"name": "web-1", "uid": "u-1"}, "spec": {"dnsPolicy": "ClusterFirst",
                  "containers": [{"name": "app", "image": "app:1"}]}}
    b = KubernetesBackend(parent_pod="web-1", namespace="ns", host_network=True, host_ports=range(21000, 21001))
    pod = b.pod_manifest(spec_for(), parent_pod, 21000)
    spec = pod["spec"]
    assert (spec["hostNetwork"], spec["dnsPolicy"]) == (True, "ClusterFirstWithHostNet")
    [container] = spec["containers"]
    assert container["ports"] == [{"name": "flame", "containerPort": 21000, "hostPort": 21000}]
    host = container["command"][container["command"].index("--host") + 1]
    assert host == "$(FLAME_POD_IP)" and container["command"][container["command"].index("--port") + 1] == "21000"
    env = {e["name"]: e for e in container["env"]}
    assert env["FLAME_POD_IP"] == {"name": "FLAME_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    # Off the host network: all of the Pod's addresses, the one port, no host port.
    plain = KubernetesBackend(parent_pod="web-1", namespace="ns", port=9000).pod_manifest(spec_for(), parent_pod)
    assert "hostNetwork" not in plain["spec"] and plain["spec"]["containers"][0]["ports"] == [
        {"name": "flame", "containerPort": 9000}]
    assert KubernetesBackend.from_env({"FLAME_K8S_HOST_NETWORK": "1"}).host_network is True
    assert KubernetesBackend.from_env({"FLAME_K8S_HOST_NETWORK": "0"}).host_network is False
    with pytest.raises(ValueError, match=r"FLAME_K8S_HOST_NETWORK='yes' is not valid: it must be `0` or `1`"):
        KubernetesBackend.from_env({"FLAME_K8S_HOST_NETWORK": "yes"})
    with pytest.raises(ValueError, match="host_ports"):
        KubernetesBackend(host_network=True, host_ports=range(0))
