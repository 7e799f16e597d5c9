#!/usr/bin/env bash
# The Docker deployment run for real on one host without GPUs and without Docker Hub:
#   an engine (started here if none answers, with its own data root, stopped afterwards), a Debian base made
#   with debootstrap, the project's image on it (docker/Dockerfile, BASE=that Debian), the project's compose
#   stack (Postgres from Debian's package: compose.debian-postgres.yaml; the run launcher without a GPU device
#   request: compose.cpu.yaml), a small replica in the "mimic" volume, manifest and one shard partition
#   launched through the webserver and run by the daemon's Docker run launcher, each run in its own container;
#   then checks Dagster's Postgres storage and MLflow hold those runs, that the UIs answer on 127.0.0.1 only;
#   tears everything down. One line per stage; the last: "docker smoke: <n> runs in containers succeeded, <s> s".
#
#   sudo docker/smoke.sh            # as root (dockerd, debootstrap); run from a clone of the repository
#
# Not part of `make test`: it builds images for many minutes. test_deployment_files.py keeps its names in step
# with the compose file. Needs: docker.io (dockerd), docker-compose (v1), debootstrap, curl (installed with apt
# when missing).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${CXR_SMOKE_DIR:-/var/tmp/cxr-docker-smoke}
DEBIAN_IMAGE=cxr-debian:bookworm
PROJECT=cxrsmoke
STARTED=$(date +%s)
OWN_ENGINE=""
COMPOSE=(docker-compose -p "$PROJECT" -f "$ROOT/docker/docker-compose.yaml" -f "$ROOT/docker/compose.debian-postgres.yaml"
         -f "$ROOT/docker/compose.cpu.yaml")

stage() { printf 'docker smoke: %-28s %s (%ss)\n' "$1" "$2" "$(( $(date +%s) - STARTED ))"; }
fail() { stage "FAILED" "$1"; exit 1; }

cleanup() {
  set +e
  if [ -n "${CXR_SMOKE_KEEP:-}" ]; then stage "kept" "the stack and engine stay up (CXR_SMOKE_KEEP)"; return; fi
  if [ -n "${COMPOSE_UP:-}" ]; then
    for r in "${RUNS[@]:-}"; do [ -n "$r" ] && docker ps -aq --filter "label=dagster/run_id=$r" | xargs -r docker rm -f >/dev/null 2>&1; done
    "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
    docker volume rm cxr_home mimic cxr_pgdata cxr_mlartifacts >/dev/null 2>&1
  fi
  if [ -n "$OWN_ENGINE" ]; then
    kill "$OWN_ENGINE" 2>/dev/null; wait "$OWN_ENGINE" 2>/dev/null
    stage "engine" "stopped"
  fi
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need dockerd || ! need docker-compose || ! need debootstrap || ! need curl; then
  apt-get install -y -q docker.io docker-compose debootstrap curl >/dev/null
fi

# 1. the engine: the one that answers, or our own
if ! docker info >/dev/null 2>&1; then
  mkdir -p "$WORK/engine/data" "$WORK/engine/exec"
  export DOCKER_HOST="unix://$WORK/engine/docker.sock"
  dockerd --data-root "$WORK/engine/data" --exec-root "$WORK/engine/exec" --pidfile "$WORK/engine/docker.pid" \
    --host "$DOCKER_HOST" >"$WORK/engine/dockerd.log" 2>&1 &
  OWN_ENGINE=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || fail "dockerd did not answer (see $WORK/engine/dockerd.log)"
  export DOCKER_SOCKET="$WORK/engine/docker.sock"  # what the daemon container mounts to launch runs
  stage "engine" "started ($(docker version -f '{{.Server.Version}}'), data root $WORK/engine/data)"
else
  stage "engine" "answering ($(docker version -f '{{.Server.Version}}'))"
fi

# the smoke run uses the deployment's own volume and network names: never on an engine that hosts the real stack
for v in cxr_home mimic cxr_pgdata; do
  if docker volume inspect "$v" >/dev/null 2>&1; then fail "volume $v exists on this engine (a deployment's?): refusing to touch it"; fi
done

# 2. a Debian base image: nothing can be pulled
if ! docker image inspect "$DEBIAN_IMAGE" >/dev/null 2>&1; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || fail "debootstrap (see $WORK/debootstrap.log)"
  tar -C "$WORK/rootfs" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
fi
stage "base image" "$DEBIAN_IMAGE"

# 3. the images: the build trusts this host's CA bundle (a TLS proxy) and takes torch from its local wheels
EXTRA="$ROOT/docker/build-extra"
mkdir -p "$EXTRA/wheels"
cp /etc/ssl/certs/ca-certificates.crt "$EXTRA/ca.crt"
for dir in /opt/pypi/files /opt/pypi-more/files; do  # where this kind of machine keeps torch 2.14.1 and its CUDA wheels
  for f in "$dir"/torch-2.14.1-cp311*.whl "$dir"/torchvision-0.29.1-cp311*.whl "$dir"/nvidia_*.whl "$dir"/cuda_*.whl "$dir"/triton-*.whl; do
    [ -e "$f" ] && { ln -f "$f" "$EXTRA/wheels/" 2>/dev/null || cp "$f" "$EXTRA/wheels/"; }
  done
done
docker build -q --build-arg "BASE=$DEBIAN_IMAGE" -t cxr-pipeline:latest -f "$ROOT/docker/Dockerfile" "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; fail "image build (see $WORK/build.log)"; }
rm -rf "$EXTRA/wheels" "$EXTRA/ca.crt"
stage "image" "cxr-pipeline:latest ($(docker image inspect -f '{{.Size}}' cxr-pipeline:latest | awk '{printf "%.1f GB", $1/1e9}'))"
# what only a report or metrics run would otherwise find missing: every module imports, the labeler (medspaCy,
# installed apart: requirements-nodeps.txt) labels a sentence, METEOR's Java is there
docker run --rm cxr-pipeline:latest python -c '
import importlib, pkgutil, cxr_pipeline
skip = ("cxr_pipeline.definitions",)  # loading it opens the Dagster instance: the stack does that below
mods = [m.name for m in pkgutil.walk_packages(cxr_pipeline.__path__, "cxr_pipeline.") if m.name not in skip]
for name in mods:
    importlib.import_module(name)
from cxr_pipeline.reports.labeler import label_report
got = label_report("Moderate cardiomegaly. No pneumothorax.")
assert got["Cardiomegaly"] == 1.0 and got["Pneumothorax"] == 0.0, got
print(len(mods))' >"$WORK/contents.log" 2>"$WORK/contents.err" && docker run --rm cxr-pipeline:latest java -version 2>>"$WORK/contents.err" \
  || { tail -20 "$WORK/contents.err"; fail "image contents (see $WORK/contents.err)"; }
stage "image contents" "$(head -1 "$WORK/contents.log") modules import; the labeler labels; java runs"

# 4. the stack, with a password made here (never written to a file)
export POSTGRES_USER=cxr POSTGRES_PASSWORD CXR_PACS_PASSWORD DEBIAN_BASE="$DEBIAN_IMAGE" CXR_BIND_ADDRESS=127.0.0.1
POSTGRES_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
CXR_PACS_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
"${COMPOSE[@]}" build -q postgres >"$WORK/compose-build.log" 2>&1 || fail "postgres image (see $WORK/compose-build.log)"
COMPOSE_UP=1
docker volume create mimic >/dev/null
docker run --rm -v mimic:/data/mimic-cxr cxr-pipeline:latest \
  cxr-pipeline synth /data/mimic-cxr --patients 12 --source-rows 64 >/dev/null 2>&1 || fail "replica"
PARTITION=$(docker run --rm -v mimic:/data/mimic-cxr:ro cxr-pipeline:latest sh -c 'ls /data/mimic-cxr/files | head -1')
stage "replica" "12 patients in volume mimic (first partition $PARTITION)"
"${COMPOSE[@]}" up -d >"$WORK/compose-up.log" 2>&1 || { tail -30 "$WORK/compose-up.log"; fail "compose up"; }
for _ in $(seq 180); do
  curl -fs http://127.0.0.1:3000/server_info >/dev/null 2>&1 && curl -fs http://127.0.0.1:5000/health >/dev/null 2>&1 && break
  sleep 2
done
curl -fs http://127.0.0.1:3000/server_info >/dev/null || { "${COMPOSE[@]}" logs --tail 40; fail "the Dagster UI did not answer"; }
curl -fs http://127.0.0.1:5000/health >/dev/null || { "${COMPOSE[@]}" logs --tail 40 mlflow; fail "the MLflow UI did not answer"; }
stage "stack up" "$("${COMPOSE[@]}" ps --services | sort | tr '\n' ' ')(UIs answering)"

# 4b. the PACS: a replica study stored by C-STORE from inside the stack's network, found by QIDO-RS with the password
for _ in $(seq 60); do curl -fs -u "cxr:$CXR_PACS_PASSWORD" http://127.0.0.1:8042/system >/dev/null 2>&1 && break; sleep 1; done
[ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8042/studies)" = 401 ] || fail "the PACS answered without the password"
docker run --rm --network cxr -v mimic:/data/mimic-cxr:ro cxr-pipeline:latest sh -c \
  'storescu -xv -aet CXR_SCU -aec CXR_PACS pacs 4242 $(ls -d /data/mimic-cxr/files/p*/p*/s* | head -1)/*.dcm' >"$WORK/storescu.log" 2>&1 \
  || { tail -20 "$WORK/storescu.log"; fail "C-STORE to the PACS service"; }
n=$(curl -fs -u "cxr:$CXR_PACS_PASSWORD" http://127.0.0.1:8042/dicom-web/studies | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
[ "$n" = 1 ] || fail "the PACS holds $n studies after one C-STORE"
stage "pacs" "a study stored by C-STORE and found by QIDO-RS; HTTP without the password refused"

# 5. runs through the webserver (queued) -> the daemon -> the Docker run launcher: one container each
submit() {  # job [partition] -> run id, waited for; inside the stack's network, with Dagster's own GraphQL client
  docker run -i --rm --network cxr cxr-pipeline:latest python - "$@" <<'PY'
import sys, time
from dagster_graphql import DagsterGraphQLClient
from dagster import DagsterRunStatus
job, part = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
client = DagsterGraphQLClient("webserver", port_number=3000)
tags = {"cxr-smoke": "1", **({"dagster/partition": part} if part else {})}
run_id = client.submit_job_execution(job, tags=tags)
for _ in range(900):
    status = client.get_run_status(run_id)
    if status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        break
    time.sleep(2)
print(run_id, status.value)
PY
}
RUNS=(); CONTAINERS=()
for spec in "manifest_job" "shards_job $PARTITION"; do
  t0=$(date +%s)
  submit $spec >"$WORK/submit.out" 2>"$WORK/submit.err" || { tail -20 "$WORK/submit.err"; fail "$spec: could not submit"; }
  read -r run_id status <"$WORK/submit.out"
  if [ "$status" != "SUCCESS" ]; then
    { docker ps -aq --filter "label=dagster/run_id=$run_id" | xargs -r -n1 docker logs 2>&1 | tail -30; "${COMPOSE[@]}" logs --tail 40 daemon; } || true
    fail "$spec: run $run_id $status"
  fi
  # the run launcher labels each run's container with its run id
  container=$(docker ps -aq --filter "label=dagster/run_id=$run_id")
  [ "$(wc -w <<<"$container")" = 1 ] || fail "$spec: $(wc -w <<<"$container") containers for run $run_id"
  image=$(docker inspect -f '{{.Config.Image}}' "$container")
  RUNS+=("$run_id"); CONTAINERS+=("$container")
  stage "run $spec" "$run_id in its own container ($image), exit $(docker inspect -f '{{.State.ExitCode}}' "$container"), $(( $(date +%s) - t0 )) s"
done

# 6. what the services recorded: Dagster's Postgres storage, MLflow's runs (tagged with the Dagster run id)
ids=$(printf "'%s'," "${RUNS[@]}"); ids=${ids%,}
ok=$("${COMPOSE[@]}" exec -T postgres psql -U cxr -d dagster -tAc "select count(*) from runs where run_id in ($ids) and status = 'SUCCESS'")
[ "$ok" = "${#RUNS[@]}" ] || fail "Postgres holds $ok of ${#RUNS[@]} runs as successful"
stage "dagster storage" "Postgres: ${ok} runs SUCCESS"
exp=$(curl -fs "http://127.0.0.1:5000/api/2.0/mlflow/experiments/get-by-name?experiment_name=cxr_pipeline" | python3 -c 'import json,sys; print(json.load(sys.stdin)["experiment"]["experiment_id"])')
found=0
for run_id in "${RUNS[@]}"; do
  n=$(curl -fs -X POST http://127.0.0.1:5000/api/2.0/mlflow/runs/search -H 'Content-Type: application/json' \
      -d "{\"experiment_ids\": [\"$exp\"], \"filter\": \"tags.\\\"dagster.run_id\\\" = '$run_id'\"}" \
      | python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("runs", [])))')
  [ "$n" -ge 1 ] || fail "MLflow has no run for Dagster run $run_id"
  found=$((found + n))
done
stage "mlflow" "$found runs for the ${#RUNS[@]} Dagster runs"

# 7. the UIs on 127.0.0.1 only (published ports bound to the loopback address, nothing else)
for port in 3000 5000 8042 4242; do
  bound=$(docker ps --format '{{.Ports}}' | tr ',' '\n' | grep -- "->$port/tcp" | sed 's/^ *//' | sort -u)
  [ -n "$bound" ] && ! grep -qv '^127\.0\.0\.1:' <<<"$bound" || fail "port $port published as: $bound"
done
stage "published ports" "3000, 5000, 8042 and 4242 on 127.0.0.1 only; postgres not published"

# the run containers first: they hold the volumes and the network the stack's own teardown removes
for c in "${CONTAINERS[@]}"; do docker rm -f "$c" >/dev/null 2>&1 || true; done
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
docker volume rm cxr_home mimic cxr_pgdata cxr_mlartifacts cxr_pacs >/dev/null 2>&1 || true
COMPOSE_UP=""
left="$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT") $(docker volume ls -q | grep -Ex 'cxr_home|mimic|cxr_pgdata|cxr_mlartifacts|cxr_pacs' || true)"
[ -z "${left// /}" ] || fail "left behind: $left"
stage "teardown" "stack, run containers, network and volumes removed"
cleanup; trap - EXIT  # the engine stops before the last line
echo "docker smoke: ${#RUNS[@]} runs in containers succeeded, $(( $(date +%s) - STARTED )) s"
