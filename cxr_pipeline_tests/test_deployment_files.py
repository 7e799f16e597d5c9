"""docker/ and the Helm values agree with the code: module, ports, environment, GPU tags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dagster as dg
import yaml

from cxr_pipeline.definitions import build_defs

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
MODULE = "cxr_pipeline.definitions"
ENV = {"CXR_HOME", "CXR_RAW_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE"}


def load(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def test_module_and_grpc_port_agree():
    workspace = load("workspace.yaml")["load_from"][0]["grpc_server"]
    compose = load("docker-compose.yaml")["services"]
    code_cmd = compose["code"]["command"]
    assert MODULE in code_cmd and str(workspace["port"]) == code_cmd[code_cmd.index("-p") + 1]
    assert workspace["host"] == "code"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f'"-m", "{MODULE}"' in dockerfile and f"EXPOSE {workspace['port']}" in dockerfile
    helm = load("helm/values.yaml")["dagster-user-deployments"]["deployments"][0]
    assert helm["dagsterApiGrpcArgs"] == ["-m", MODULE] and helm["port"] == workspace["port"]
    assert (ROOT / "pyproject.toml").read_text().count(f'module_name = "{MODULE}"') == 1


def test_environment_is_passed_everywhere_it_is_needed():
    compose = load("docker-compose.yaml")["services"]
    for svc in ("code", "webserver", "daemon"):
        assert ENV <= set(compose[svc]["environment"]), svc
    instance = load("dagster.yaml")
    assert ENV <= set(instance["run_launcher"]["config"]["env_vars"])
    helm = load("helm/values.yaml")
    assert ENV <= {e["name"] for e in helm["dagster-user-deployments"]["deployments"][0]["env"]}
    assert ENV <= set(helm["runLauncher"]["config"]["k8sRunLauncher"]["envVars"])


def test_the_passed_environment_is_what_the_code_reads(tmp_path, monkeypatch):
    """Each variable the deployment files pass changes what the code does."""
    from cxr_pipeline.config import resolve
    from cxr_pipeline.definitions import build_defs as build
    from cxr_pipeline.settings import paths

    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXR_RAW_DIR", str(tmp_path / "mimic"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    p = paths()
    assert p.home == tmp_path / "home" and p.raw == tmp_path / "mimic" and p.tracking_uri == "http://mlflow:5000"
    assert resolve(p, "classifier", {"size": 64}).size == 64
    resources = build().resources
    assert resources["storage"].raw_dir == str(tmp_path / "mimic") and resources["storage"].home == str(tmp_path / "home")
    assert resources["mlflow"].tracking_uri == "http://mlflow:5000" and resources["mlflow"].artifact_root is None


def test_instance_uses_postgres_queue_docker_and_gpu_pool():
    instance = load("dagster.yaml")
    assert "postgres" in instance["storage"] and instance["storage"]["postgres"]["postgres_db"]["hostname"] == "postgres"
    assert instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert instance["run_launcher"]["class"] == "DockerRunLauncher" and instance["run_launcher"]["config"]["network"] == "cxr"
    assert instance["run_launcher"]["config"]["container_kwargs"]["device_requests"][0]["driver"] == "nvidia"
    assert instance["concurrency"]["pools"]["default_limit"] == 1
    assert instance["run_monitoring"]["free_slots_after_run_end_seconds"] > 0
    compose = load("docker-compose.yaml")
    assert compose["networks"]["cxr"]["name"] == "cxr"
    mlflow_cmd = compose["services"]["mlflow"]["command"][0]  # one string for ``sh -c`` (the credentials expand there)
    assert "--workers 1" in mlflow_cmd and "postgresql+psycopg2://" in mlflow_cmd  # the driver the image has
    assert instance["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"
    assert compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    port = re.search(r"--port (\d+)", mlflow_cmd).group(1)
    assert compose["x-cxr-env"]["MLFLOW_TRACKING_URI"].endswith(f":{port}")
    assert load("helm/values.yaml")["runLauncher"]["type"] == "K8sRunLauncher"
    assert load("helm/values.yaml")["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"


def test_gpu_assets_share_the_pool_request_a_gpu_on_kubernetes_and_retry():
    graph = build_defs().resolve_asset_graph()
    for key in ("classifier", "report_adapter", "generated_reports"):
        node = graph.get(dg.AssetKey(key))
        assert node.pools == {"gpu"}, key
        tags = json.loads(node.assets_def.op.tags["dagster-k8s/config"])  # Dagster stores dict tags as JSON
        assert tags["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert node.assets_def.op.retry_policy is not None and node.assets_def.op.retry_policy.max_retries >= 1, key


# --- safe by default (#17) -------------------------------------------------------------------------

DEPLOY_FILES = [p for p in DOCKER.rglob("*") if p.is_file() and p.name != ".env"]
INTERPOLATED = re.compile(r"^\$\{[A-Z_]+(:[-?][^}]*)?\}$")


def test_no_secret_in_any_deployment_file():
    compose = load("docker-compose.yaml")
    for name, svc in compose["services"].items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if "PASSWORD" in key:
                assert INTERPOLATED.match(str(value)), f"{name}: {key} is a literal; read it from docker/.env"

    def literal_passwords(node, where):
        if isinstance(node, dict):
            for k, v in node.items():
                if "password" in str(k).lower() and isinstance(v, str | int) and not isinstance(v, bool) and not INTERPOLATED.match(str(v)):
                    yield f"{where}.{k} = {v!r}"
                yield from literal_passwords(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from literal_passwords(v, f"{where}[{i}]")

    for f in DEPLOY_FILES:
        text = f.read_text(errors="replace")
        assert not re.search(r"://[^/\s:@$]+:[^/\s@$]+@", text), f"{f}: credentials in a URL"
        if f.suffix == ".yaml":
            assert [bad for doc in yaml.safe_load_all(text) for bad in literal_passwords(doc, f.name)] == []
    helm = load("helm/values.yaml")
    assert "postgresqlPassword" not in helm.get("postgresql", {}) and helm["generatePostgresqlPasswordSecret"] is False
    assert helm["global"]["postgresqlSecretName"] == helm["postgresql"]["existingSecret"]
    # the example is checked in, the real file is ignored
    assert "POSTGRES_PASSWORD=" in (DOCKER / ".env.example").read_text()
    assert "docker/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_nothing_is_published_on_all_interfaces():
    compose = load("docker-compose.yaml")["services"]
    published = {name: svc.get("ports", []) for name, svc in compose.items()}
    assert published["postgres"] == []  # Postgres is reachable only inside the compose network
    for name, ports in published.items():
        for port in ports:
            host = str(port).rsplit(":", 2)[0]
            assert host == "${CXR_BIND_ADDRESS:-127.0.0.1}", f"{name}: {port} (bind to 127.0.0.1 unless CXR_BIND_ADDRESS says otherwise)"
    assert set(k for k, v in published.items() if v) == {"webserver", "mlflow", "pacs"}
    assert load("helm/values.yaml")["dagsterWebserver"]["service"]["type"] == "ClusterIP"


def test_the_docker_socket_only_where_runs_are_launched():
    """The daemon launches every run as a container (DockerRunLauncher); nothing else gets root on the
    host by default. Terminating a started run from the UI is an explicit opt-in file."""
    compose = load("docker-compose.yaml")["services"]
    with_socket = {name for name, svc in compose.items() if any("docker.sock" in str(v) for v in svc.get("volumes", []))}
    assert with_socket == {"daemon"}
    assert load("dagster.yaml")["run_coordinator"]["class"] == "QueuedRunCoordinator"  # the UI only queues
    opt_in = load("compose.terminate-from-ui.yaml")["services"]
    assert set(opt_in) == {"webserver"} and "docker.sock" in str(opt_in["webserver"]["volumes"])


def test_the_helm_chart_version_is_the_installed_dagster():
    """The chart runs the webserver and daemon, the image the user code: one Dagster version for both."""
    import re
    from importlib.metadata import version

    pins = re.findall(r"helm install .*--version (\S+)", (DOCKER / "helm" / "values.yaml").read_text())
    assert pins == [version("dagster")]


def test_the_smoke_run_and_its_overrides_agree_with_the_compose_file():
    """docker/smoke.sh and the two overrides it selects name the services, ports, volumes and variables the
    compose file has: a rename there breaks this test, not a 20-minute image build."""
    compose = load("docker-compose.yaml")
    services = compose["services"]
    smoke = (DOCKER / "smoke.sh").read_text()
    for override in ("compose.debian-postgres.yaml", "compose.cpu.yaml"):
        assert set(load(override)["services"]) <= set(services), override
        assert f'"$ROOT/docker/{override}"' in smoke
    assert set(load("compose.cpu.yaml")["services"]) == {"code", "webserver", "daemon"}  # every Dagster process
    # the CPU instance is the one dagster.yaml without the GPU device request, derived in the image
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "/opt/dagster/home-cpu" in dockerfile and "pop('device_requests')" in dockerfile
    assert {s["environment"]["DAGSTER_HOME"] for s in load("compose.cpu.yaml")["services"].values()} == {"/opt/dagster/home-cpu"}
    assert "device_requests" in load("dagster.yaml")["run_launcher"]["config"]["container_kwargs"]
    # ports the smoke run checks are the ones published; the network its client joins is the compose network
    published = {str(p).rsplit(":", 2)[-2] for s in services.values() for p in s.get("ports", [])}
    assert published == {"3000", "5000", "8042", "4242"} and "127.0.0.1:3000" in smoke and "127.0.0.1:5000" in smoke
    assert "127.0.0.1:8042" in smoke and "for port in 3000 5000 8042 4242" in smoke
    assert f"--network {compose['networks']['cxr']['name']}" in smoke
    assert 'DagsterGraphQLClient("webserver", port_number=3000)' in smoke
    # the volumes the run launcher mounts by name are the compose volumes' own names (no project prefix)
    launcher_mounts = {v.split(":")[0] for v in load("dagster.yaml")["run_launcher"]["config"]["container_kwargs"]["volumes"]}
    named = {v["name"] for v in compose["volumes"].values()}
    assert {"cxr_home", "mimic"} <= launcher_mounts and {"cxr_home", "mimic"} <= named
    assert all(f"{v}:" in smoke for v in ("mimic",)) and all(v in smoke for v in named)
    # the variables the compose file requires are the ones the smoke run exports
    required = set(re.findall(r"\$\{(\w+):\?", (DOCKER / "docker-compose.yaml").read_text()))
    assert (
        required == {"POSTGRES_PASSWORD", "CXR_PACS_PASSWORD"} and "export POSTGRES_USER=cxr POSTGRES_PASSWORD CXR_PACS_PASSWORD" in smoke
    )
    assert "DOCKER_SOCKET" in smoke and "${DOCKER_SOCKET:-/var/run/docker.sock}" in (DOCKER / "docker-compose.yaml").read_text()
    assert 'echo "docker smoke: ${#RUNS[@]} runs in containers succeeded' in smoke
    assert "ARG BASE=" in dockerfile and "FROM ${BASE}" in dockerfile
    assert "args: {BASE:" in (DOCKER / "compose.debian-postgres.yaml").read_text()


def test_the_image_installs_what_make_installs_and_its_dependencies_before_the_code():
    """The image's environment comes from the lists the Makefile installs: pyproject's dependencies and
    requirements-nodeps.txt (medspaCy: without it every report run failed in a container, which the smoke run's
    manifest and shard runs never showed). The dependency layer is built from those two files only, before the
    code and README are copied: an edit there must not reinstall PyTorch, Dagster and MLflow (minutes)."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for text in (dockerfile, (ROOT / "Makefile").read_text()):
        assert "--no-deps -r requirements-nodeps.txt" in text
    assert "!requirements-nodeps.txt" in (ROOT / ".dockerignore").read_text().splitlines()
    assert "medspacy==" in (ROOT / "requirements-nodeps.txt").read_text()
    order = [
        "COPY pyproject.toml requirements-nodeps.txt ./",
        "pip install $links -r /tmp/requirements.txt",
        "COPY README.md ./",
        "COPY cxr_pipeline ./cxr_pipeline",
        "pip install --no-deps --no-build-isolation -e .",
    ]
    assert [dockerfile.index(step) for step in order] == sorted(dockerfile.index(step) for step in order)
    assert "p['project']['dependencies'] + p['build-system']['requires']" in dockerfile
    # the smoke run checks what only a report run would otherwise find: the labeler and Java in the image
    assert "label_report(" in (DOCKER / "smoke.sh").read_text() and "java -version" in (DOCKER / "smoke.sh").read_text()


def test_every_variable_the_run_launcher_passes_is_set_in_the_daemon():
    """DockerRunLauncher copies each name in env_vars from the daemon's environment and fails the launch when one
    is unset (found by docker/smoke.sh: CXR_VLM_BASE was listed but not set)."""
    passed = set(load("dagster.yaml")["run_launcher"]["config"]["env_vars"])
    daemon = set(load("docker-compose.yaml")["services"]["daemon"]["environment"])
    assert passed <= daemon, passed - daemon
