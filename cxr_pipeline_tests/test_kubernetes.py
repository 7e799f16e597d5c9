"""The cluster path, offline: every step's Kubernetes Job as dagster-k8s builds it validates against the
Kubernetes schema (strict), GPU steps carry what GPU node pools need, the manifests the chart does not
deploy validate, the deployment (not the code) owns the ``gpu`` pool's limit, and no device lock lands on
the shared volume. No cluster runs here: the schema is kubernetes-validate's, shipped offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import kubernetes
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "docker" / "k8s"
VALUES = yaml.safe_load((ROOT / "docker" / "helm" / "values.yaml").read_text())
VERSION = "1.37.0"


def _validate(manifest: dict) -> None:
    kubernetes_validate.validate(manifest, VERSION, strict=True)


def test_the_validator_is_strict():
    """An unknown field fails: the schema checks are real."""
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, "spec": {"template": {"spec": {"containers": []}}}}
    job["spec"]["template"]["spec"]["contianers"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(job)


def _step_jobs(monkeypatch) -> dict[str, dict]:
    """Every asset's step Job as the k8s_job_executor builds it, under the values file's run launcher settings."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

    from cxr_pipeline.definitions import build_defs

    monkeypatch.setenv("CXR_EXECUTOR", "k8s")
    deployment = VALUES["dagster-user-deployments"]["deployments"][0]
    launcher = VALUES["runLauncher"]["config"]["k8sRunLauncher"]
    env = {e["name"]: e["value"] for e in deployment["env"]}  # what the launcher's pods inherit
    base = K8sContainerContext(
        namespace="cxr",
        env_vars=[f"{name}={env.get(name, '1')}" for name in launcher["envVars"]],
        volumes=launcher["volumes"],
        volume_mounts=launcher["volumeMounts"],
        image_pull_policy=deployment["image"]["pullPolicy"],
    )
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    job_config = DagsterK8sJobConfig(
        job_image=image, dagster_home="/opt/dagster/dagster_home", instance_config_map="cxr-dagster-instance", postgres_password_secret="x"
    )
    graph = build_defs().resolve_asset_graph()
    jobs = {}
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        ctx = base.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(node.assets_def.op.tags)))
        name = f"dagster-step-{node.assets_def.op.name.replace('_', '-')}"
        job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], name, ctx.run_k8s_config, name, "step_worker")
        jobs[key.to_user_string()] = kubernetes.client.ApiClient().sanitize_for_serialization(job)
    return jobs


def test_every_step_job_validates_and_gpu_steps_carry_what_gpu_nodes_need(monkeypatch):
    jobs = _step_jobs(monkeypatch)
    assert len(jobs) == 17  # every materializable asset (the three observable sources run no step)
    for key, job in jobs.items():
        _validate(job)
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        requests = container["resources"]["requests"]
        assert {"cpu", "memory"} <= set(requests), key  # every step says what it needs
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/data/cxr", "/data/mimic-cxr"} <= mounts, key
    gpu_steps = {k for k, j in jobs.items() if "nvidia.com/gpu" in j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]}
    assert gpu_steps == {
        "classifier",
        "multilabel_classifier",
        "report_hints",
        "external_validation",
        "localization_metrics",
        "image_drift",
        "report_adapter",
        "generated_reports",
    }
    for key in gpu_steps:
        pod = jobs[key]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory" and any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
        assert float(container["resources"]["requests"]["cpu"]) >= 2
    # a shard step asks for the CPUs its decode workers use
    shard = jobs["image_shards"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert shard["requests"]["cpu"] == shard["limits"]["cpu"] == "4"  # image_shards.workers null: the default a pod is sized for


def test_gpu_scheduling_keys_are_the_deployments():
    """Node selector and toleration keys differ between clusters: set per deployment, in the environment the code
    loads with (a code server or step pod started with them)."""
    selector = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    tolerations = [{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}]
    env = {**os.environ, "CXR_K8S_GPU_NODE_SELECTOR": json.dumps(selector), "CXR_K8S_GPU_TOLERATIONS": json.dumps(tolerations)}
    code = (
        "import json, dagster as dg; from cxr_pipeline.definitions import defs; "
        "print(defs.resolve_asset_graph().get(dg.AssetKey('classifier')).assets_def.op.tags['dagster-k8s/config'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    pod = json.loads(out.stdout.strip().splitlines()[-1])["pod_spec_config"]
    assert pod["node_selector"] == selector and pod["tolerations"] == tolerations


def test_the_manifests_the_chart_does_not_deploy_validate():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    kinds = []
    for name in sorted(listed):
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            _validate(doc)
            kinds.append((doc["kind"], doc["metadata"]["name"]))
    claims = {
        n: d
        for name in listed
        for d in yaml.safe_load_all((K8S / name).read_text())
        if d["kind"] == "PersistentVolumeClaim"
        for n in [d["metadata"]["name"]]
    }
    assert claims["cxr-home"]["spec"]["accessModes"] == ["ReadWriteMany"] and claims["mimic-cxr"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert {("Deployment", "mlflow"), ("Service", "mlflow"), ("Job", "cxr-gpu-pool")} <= set(kinds)
    # what the values file points at exists here: the claims, the MLflow service, the Secret the chart reads
    launcher = VALUES["runLauncher"]["config"]["k8sRunLauncher"]
    assert {v["persistentVolumeClaim"]["claimName"] for v in launcher["volumes"]} == set(claims)
    tracking = next(e["value"] for e in VALUES["dagster-user-deployments"]["deployments"][0]["env"] if e["name"] == "MLFLOW_TRACKING_URI")
    assert tracking == f"http://mlflow.{kustomization['namespace']}.svc.cluster.local:5000"
    assert VALUES["global"]["postgresqlSecretName"] in (K8S / "mlflow.yaml").read_text()


# --- the gpu pool's limit on a cluster belongs to the deployment ---------------------------------------

LOAD = "import cxr_pipeline.definitions"  # what a code server and every step pod do first


def _instance(tmp_path: Path) -> Path:
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text("storage:\n  sqlite:\n    base_dir: " + str(home / "storage") + "\ntelemetry:\n  enabled: false\n")
    return home


def test_a_pool_limit_set_by_the_deployment_survives_the_code_on_a_cluster(tmp_path, cxr_home, monkeypatch):
    from cxr_pipeline.defs.slots import GPU_POOL, dead_run_sensor

    home = _instance(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("CXR_EXECUTOR", "k8s")
    with dg.DagsterInstance.get() as instance:
        instance.event_log_storage.set_concurrency_slots(GPU_POOL, 4)  # `dagster instance concurrency set gpu 4`
    env = {**os.environ, "DAGSTER_HOME": str(home), "CXR_EXECUTOR": "k8s"}
    # the code server
    served = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "dagster"), "definitions", "validate", "-m", "cxr_pipeline.definitions"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr[-2000:]
    # a step pod
    step = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert step.returncode == 0, step.stderr[-2000:]
    # the daemon's sensor
    with dg.DagsterInstance.get() as instance:
        dead_run_sensor(dg.build_sensor_context(instance=instance))
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 4
    # on one host the code still keeps it at the device count
    monkeypatch.setenv("CXR_EXECUTOR", "")
    monkeypatch.setenv("CXR_GPUS", "2")
    with dg.DagsterInstance.get() as instance:
        dead_run_sensor(dg.build_sensor_context(instance=instance))
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 2


# --- the device lease only where it decides something ---------------------------------------------------


def test_no_lease_where_the_engine_gave_the_device_and_no_lock_on_the_shared_volume(tmp_path, cxr_home, monkeypatch):
    from cxr_pipeline.devices import lease

    monkeypatch.setenv("CXR_LOCK_DIR", str(tmp_path / "node-local"))
    monkeypatch.setenv("CXR_GPUS", "2")
    monkeypatch.setenv("CXR_EXECUTOR", "k8s")
    given = lease()
    assert given.fd is None and given.device("cuda") == "cuda:0"  # the pod sees the one device it was given
    assert not (tmp_path / "node-local").exists()
    monkeypatch.setenv("CXR_GPUS", "1")
    monkeypatch.setenv("CXR_EXECUTOR", "")
    one = lease()
    assert one.fd is None and one.device("cuda") == "cuda:0"  # one device: nothing to choose
    monkeypatch.setenv("CXR_GPUS", "2")
    first, second = lease(), lease()  # several devices on one host: a lease each, in the node-local folder
    try:
        assert {first.device("cuda"), second.device("cuda")} == {"cuda:0", "cuda:1"} and first.fd is not None
        assert sorted(p.name for p in (tmp_path / "node-local").iterdir()) == ["gpu-0.lock", "gpu-1.lock"]
    finally:
        first.release()
        second.release()
    assert not (cxr_home / "locks").exists()  # never under CXR_HOME, a volume a cluster shares
