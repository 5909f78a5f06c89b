"""The showcase deployed on the real cluster as docs/deploy/kubernetes.md deploys it.

The image is the repository's own Dockerfile (``.ci/kubernetes-images.sh``), tagged with
the name the page uses. The page's files are applied as they are: kubernetes-rbac.yaml,
deployment.yaml and service.yaml, with the page's host-network patch through its
kustomization.yaml, in the namespace the RBAC file names (``default``). One more patch says
what only this machine needs: the web port and its probe (a free port: 8000 may be taken),
runner CPU that fits two runners on two cores, and where the API server is (no kube-proxy
routes the ``kubernetes`` Service here). PostgreSQL runs on this machine, reached by web
and runner Pods on 127.0.0.1 (they are on the node's network).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.backends.kubernetes.cluster import REPO, Cluster, free_port
from tests.postgres import postgres_server

pytestmark = [pytest.mark.kubernetes, pytest.mark.timeout(300, func_only=True)]

DOCS = REPO / "docs"
RUNNERS = "app.kubernetes.io/managed-by=flame_asgi"


@dataclasses.dataclass
class Web:
    cluster: Cluster
    url: str

    def pods(self, selector: str = "app=web") -> list[dict[str, Any]]:
        listed = json.loads(self.cluster.kubectl("get", "pods", "-n", "default", "-l", selector, "-o", "json"))
        return list(listed["items"])

    def runner_pods(self) -> list[dict[str, Any]]:
        return self.pods(RUNNERS)

    def runner_secrets(self) -> list[str]:
        listed = json.loads(self.cluster.kubectl("get", "secrets", "-n", "default", "-l", RUNNERS, "-o", "json"))
        return [s["metadata"]["name"] for s in listed["items"]]

    def web_pod(self) -> dict[str, Any]:
        """The web Pod that is up and Ready (waiting for it, after a restart or a re-creation)."""
        deadline = time.monotonic() + 120
        while True:
            for pod in self.pods():
                if pod["metadata"].get("deletionTimestamp"):
                    continue
                ready = [c for c in pod["status"].get("conditions") or () if c["type"] == "Ready"]
                if ready and ready[0]["status"] == "True":
                    return pod
            assert time.monotonic() < deadline, f"no Ready web Pod:\n{self.cluster.kubectl('describe', 'pods')}"
            time.sleep(0.5)

    def run_job(self, frames: int = 2) -> dict[str, Any]:
        """POST a job (a sample video made by ffmpeg on the runner), wait until it is done."""
        self.web_pod()
        job = httpx.post(f"{self.url}/api/jobs", data={"count": str(frames)}, timeout=30).json()
        deadline = time.monotonic() + 180
        while True:
            state = httpx.get(f"{self.url}/api/jobs/{job['id']}", timeout=10).json()
            if state["status"] not in ("pending", "running"):
                return dict(state)
            assert time.monotonic() < deadline, f"job still {state['status']}"
            time.sleep(0.5)


def doc_files(folder: Path) -> None:
    """Write the page's YAML files (each block opens with a ``# name.yaml`` line) to ``folder``."""
    page = (DOCS / "deploy" / "kubernetes.md").read_text()
    for block in re.findall(r"```yaml\n(# (\S+\.yaml)\n.*?)```", page, re.S):
        text, name = block
        (folder / name).write_text(text)
    shutil.copy(DOCS / "kubernetes-rbac.yaml", folder / "kubernetes-rbac.yaml")


def this_machine(port: int, cluster: Cluster) -> dict[str, Any]:
    env = {"PORT": str(port), "FLAME_K8S_CPU": "500m",
           "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(cluster.api_port)}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"template": {
        "spec": {"containers": [{
            "name": "web", "image": cluster.app_image,
            "env": [{"name": k, "value": v} for k, v in env.items()],
            "readinessProbe": {"httpGet": {"path": "/api/stats", "port": port}, "periodSeconds": 1}}]}}}}


@pytest.fixture(scope="module")
def web(cluster: Cluster, media: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    folder = tmp_path_factory.mktemp("deploy")
    doc_files(folder)
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["patches"] == [{"path": "host-network.yaml"}]  # the page's, unchanged
    kustomization["patches"].append({"path": "this-machine.yaml"})
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    port = free_port()
    (folder / "this-machine.yaml").write_text(yaml.safe_dump(this_machine(port, cluster)))
    with postgres_server() as database:
        # The page's step 3: the database URL in a Secret, then the manifests.
        cluster.kubectl("create", "secret", "generic", "thumbs-db", f"--from-literal=url={database}")
        cluster.kubectl("apply", "-k", str(folder))
        try:
            web = Web(cluster, f"http://127.0.0.1:{port}")
            web.web_pod()
            yield web
        finally:
            cluster.kubectl("delete", "-k", str(folder), "--wait=true", "--timeout=90s", check=False)
            cluster.kubectl("delete", "secret", "thumbs-db", check=False)
            wait(lambda: not web.pods() and not web.runner_pods(), "the web and runner Pods to go", within=90)


def wait(check: Callable[[], bool], what: str, within: float) -> float:
    """Wait until ``check()``; return the seconds it took."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, f"{what} did not happen within {within:.0f} s"
        time.sleep(0.2)
    return time.monotonic() - start


def container_pid(pod: dict[str, Any]) -> int:
    """The host PID of the web container's process (the kubelet runs it with Docker)."""
    [status] = pod["status"]["containerStatuses"]
    cid = status["containerID"].removeprefix("docker://")
    return int(subprocess.run(["docker", "inspect", "--format", "{{.State.Pid}}", cid], capture_output=True,
                              text=True, check=True).stdout)


def owner_uids(pod: dict[str, Any]) -> list[str]:
    return [o["uid"] for o in pod["metadata"].get("ownerReferences") or ()]


def test_a_request_runs_on_runner_pods_that_scale_from_zero_to_two_and_back(web: Web) -> None:
    parent = web.web_pod()
    assert web.runner_pods() == []
    job = web.run_job()
    assert job["status"] == "done", job
    assert [t["index"] for t in job["thumbnails"]] == [0, 1]
    [runner] = web.runner_pods()
    # The work ran in a runner Pod the web Pod owns, made by the web Pod's pool (its name is
    # the runner's id, which the job records).
    assert owner_uids(runner) == [parent["metadata"]["uid"]]
    assert runner["metadata"]["name"] == f"flame-{job['runner_id']}".lower()
    assert runner["spec"]["hostNetwork"] is True
    assert runner["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "500m"

    # Four jobs at once: the pool grows to its max=2 (the showcase's), no further.
    with httpx.Client(base_url=web.url, timeout=30) as http:
        jobs = [http.post("/api/jobs", data={"count": "8"}).json()["id"] for _ in range(4)]
        wait(lambda: len(web.runner_pods()) == 2, "a second runner Pod", within=120)
        wait(lambda: all(http.get(f"/api/jobs/{j}").json()["status"] == "done" for j in jobs), "the jobs", 240)
    assert len(web.runner_pods()) == 2
    # ... and back to zero after the showcase's idle_shutdown_after=30, Secrets too.
    took = wait(lambda: not web.runner_pods() and not web.runner_secrets(), "idle shutdown", within=90)
    print(f"runner Pods gone {took:.1f} s after the last job")


def test_a_killed_parent_process_leaves_runners_that_exit_by_themselves(web: Web) -> None:
    assert web.run_job()["status"] == "done"
    parent = web.web_pod()
    [runner] = web.runner_pods()
    os.kill(container_pid(parent), signal.SIGKILL)  # no shutdown, no cleanup

    def runner_ended() -> bool:
        pods = [p for p in web.runner_pods() if p["metadata"]["name"] == runner["metadata"]["name"]]
        return not pods or pods[0]["status"].get("phase") in ("Succeeded", "Failed")
    took = wait(runner_ended, "the orphaned runner to exit", within=60)
    print(f"the runner exited {took:.1f} s after its parent was killed")
    # The kubelet restarts the web container in the same Pod; its pool, as it starts,
    # deletes the runner Pods (and Secrets) the killed process left.
    wait(lambda: not web.runner_pods() and not web.runner_secrets(), "the restarted parent's sweep", within=120)
    again = web.web_pod()
    assert again["metadata"]["uid"] == parent["metadata"]["uid"]
    assert again["status"]["containerStatuses"][0]["restartCount"] >= 1


def test_deleting_the_parent_pod_lets_the_garbage_collector_delete_its_runners(web: Web) -> None:
    assert web.run_job()["status"] == "done"
    parent = web.web_pod()
    [runner] = web.runner_pods()
    pid = container_pid(parent)
    # Frozen, the parent cannot delete its runners itself as it shuts down: whatever deletes
    # them is Kubernetes, following the runners' ownerReferences to a Pod that is gone.
    os.kill(pid, signal.SIGSTOP)
    try:
        web.cluster.kubectl("delete", "pod", parent["metadata"]["name"], "--grace-period=0", "--force",
                            "--wait=false")
        # The collector marks the runner Pod for deletion (its Secret goes at once), then the
        # kubelet stops its container within the Pod's grace period and the object is gone.
        marked = wait(lambda: all(p["metadata"].get("deletionTimestamp") for p in web.runner_pods())
                      and not web.runner_secrets(), "garbage collection", within=60)
        took = marked + wait(lambda: not web.runner_pods(), "the runner Pod to go", within=60)
        print(f"garbage collector: runner Secret deleted and Pod marked {marked:.1f} s, Pod gone {took:.1f} s "
              "after the parent Pod was deleted")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    gone = runner["metadata"]["name"]
    assert gone not in [p["metadata"]["name"] for p in web.runner_pods()]
    # The Deployment replaces the web Pod, and the new one serves.
    assert web.web_pod()["metadata"]["uid"] != parent["metadata"]["uid"]
    assert web.run_job()["status"] == "done"
