# Every target creates .venv and installs the project into it when needed, so on a
# fresh machine `make demo`, `make test` or `make ui` is the only command.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision are pinned to the builds this machine serves from local disk;
# other versions download gigabytes, and PyPI torchvision fails beside a CPU torch.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

export CXR_HOME ?= $(CURDIR)/.cxr
export DAGSTER_HOME ?= $(CXR_HOME)/dagster
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export NO_MKDOCS_2_WARNING := 1

.PHONY: install test demo ui mlflow-ui pacs serve bench lint docs docs-serve clean

$(STAMP): pyproject.toml requirements-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[dev]" $(TORCH_PIN)
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt  # the labeler's medspaCy: see the file
	touch $(STAMP)

install: $(STAMP)

# Two workers, a test file each at a time (pytest-xdist), the longest files first (conftest orders them by their
# slow(minutes=...) marks; --no-loadscope-reorder keeps that order), each worker on its own core (conftest); then
# the tests marked solo, alone on every core (the real daemon's test: its runs are processes of their own, and on
# one core beside another worker it took 637 s instead of 343 s).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10 -m "not solo"
	$(BIN)/python -m pytest -q --durations=3 -m solo

# DEMO_ARGS: options for `cxr-pipeline demo` (the README test runs `make demo` on a smaller replica)
demo: $(STAMP)
	$(BIN)/cxr-pipeline demo $(DEMO_ARGS)

ui: $(STAMP)
	mkdir -p $(DAGSTER_HOME)
	cp -n dagster.yaml $(DAGSTER_HOME)/dagster.yaml 2>/dev/null || true
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

pacs: $(STAMP)  # a local Orthanc with DICOMweb on 127.0.0.1 (apt-get install orthanc orthanc-dicomweb)
	$(BIN)/cxr-pipeline pacs

mlflow-ui: $(STAMP)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --workers 1 \
	  --backend-store-uri sqlite:///$(CXR_HOME)/mlflow.db --default-artifact-root $(CXR_HOME)/mlartifacts \
	  -h 127.0.0.1 -p 5000

# A registered classifier over HTTP: make serve MODEL=cxr-cardiomegaly@champion (POST {"inputs": uint8 images} to /invocations)
MODEL ?= cxr-cardiomegaly@champion
serve: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CXR_HOME)/mlflow.db} \
	  $(BIN)/mlflow models serve -m models:/$(MODEL) --env-manager local -h 127.0.0.1 -p 5001 --workers 1

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_manifest.py
	$(BIN)/python benchmarks/bench_labeler.py

# The documentation site (MkDocs Material); docs/reference/ is regenerated from the code by every build.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

docs-serve: $(STAMP)
	$(BIN)/mkdocs serve -a 127.0.0.1:8000

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

clean:
	rm -rf $(CXR_HOME)
