# sandbox-executor: `make help` lists the targets.

PYTHON       ?= python3
VENV         ?= .venv
BASE_IMAGE   ?= sandbox-executor/base:bookworm
SANDBOX_IMAGE ?= sandbox-executor/sandbox:latest
NUMPY_IMAGE  ?= sandbox-executor/numpy:latest
PYTEST_ARGS  ?=
DOCKER_BUILDKIT ?= 0
export DOCKER_BUILDKIT

# The wire version (executor/sandbox/contract.py) the images' child runtime speaks,
# as a label the parent checks before it starts anything.
WIRE_VERSION := $(shell sed -n 's/^WIRE_VERSION = \([0-9][0-9]*\)$$/\1/p' executor/sandbox/contract.py)
IMAGE_LABELS := --label io.sandbox-executor.wire-version=$(WIRE_VERSION)

VPY   := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUILD := build
ARCH  := $(shell uname -m)
LINT_DIRS := executor tests examples $(wildcard bench)

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -c constraints.txt -e '.[dev,cli]'
	touch $@

.PHONY: install
install: $(STAMP) ## Make .venv with the package and its dev tools

.PHONY: protos
protos: $(STAMP) ## Regenerate the checked-in protobuf and gRPC code
	PATH=$(abspath $(VENV))/bin:$$PATH $(VPY) -m grpc_tools.protoc -Iproto \
	  --python_out=. --pyi_out=. --grpc_python_out=. --mypy_grpc_out=. \
	  proto/executor/v1/sandbox.proto

.PHONY: check-protos
check-protos: $(STAMP) ## Fail if the generated code is stale
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	PATH=$(abspath $(VENV))/bin:$$PATH $(VPY) -m grpc_tools.protoc -Iproto \
	  --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp --mypy_grpc_out=$$tmp \
	  proto/executor/v1/sandbox.proto >/dev/null 2>&1 && \
	for f in sandbox_pb2.py sandbox_pb2.pyi sandbox_pb2_grpc.py sandbox_pb2_grpc.pyi; do \
	  cmp -s $$tmp/executor/v1/$$f executor/v1/$$f || { echo "executor/v1/$$f is stale: run 'make protos'"; exit 1; }; \
	done; echo "generated code is up to date"

.PHONY: lint
lint: $(STAMP) ## ruff and mypy (strict on the package)
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/mypy

.PHONY: typecheck
typecheck: $(STAMP) ## mypy only (strict on the package)
	$(VENV)/bin/mypy

.PHONY: check
check: lint check-protos ## All static checks

# The image's context holds only the child runtime and its wheels.
$(BUILD)/sandbox/.wheels: constraints.txt
	rm -rf $(BUILD)/sandbox/lib && mkdir -p $(BUILD)/sandbox/lib
	$(VPY) -m pip install -q --target $(BUILD)/sandbox/lib --no-deps --only-binary=:all: \
	  --implementation cp --python-version 3.11 --platform manylinux_2_28_$(ARCH) \
	  --platform manylinux_2_17_$(ARCH) --platform manylinux2014_$(ARCH) \
	  $$(grep -E '^(grpcio|protobuf|typing_extensions)==' constraints.txt)
	rm -rf $(BUILD)/sandbox/lib/bin $(BUILD)/sandbox/lib/*.dist-info/RECORD
	touch $@

# numpy for the numpy image only: the parent never imports it (not in constraints.txt).
$(BUILD)/numpy/.wheels: images/numpy/requirements.txt
	rm -rf $(BUILD)/numpy/lib && mkdir -p $(BUILD)/numpy/lib
	$(VPY) -m pip install -q --target $(BUILD)/numpy/lib --no-deps --no-compile --only-binary=:all: \
	  --implementation cp --python-version 3.11 --platform manylinux_2_28_$(ARCH) \
	  --platform manylinux_2_17_$(ARCH) --platform manylinux2014_$(ARCH) \
	  -r images/numpy/requirements.txt
	rm -rf $(BUILD)/numpy/lib/bin $(BUILD)/numpy/lib/*.dist-info/RECORD
	find $(BUILD)/numpy/lib -type d -name tests -prune -exec rm -rf {} +
	touch $@

.PHONY: images
images: $(STAMP) $(BUILD)/sandbox/.wheels $(BUILD)/numpy/.wheels ## Build the base (offline), sandbox and numpy images
	@test -n "$(WIRE_VERSION)" || { echo "no WIRE_VERSION in executor/sandbox/contract.py"; exit 1; }
	images/base/build.sh $(BASE_IMAGE)
	rm -rf $(BUILD)/sandbox/lib/executor && mkdir -p $(BUILD)/sandbox/lib/executor
	cp executor/__init__.py $(BUILD)/sandbox/lib/executor/
	cp -r executor/sandbox executor/v1 $(BUILD)/sandbox/lib/executor/
	find $(BUILD)/sandbox/lib/executor -name '__pycache__' -prune -exec rm -rf {} +
	cp images/sandbox/Dockerfile $(BUILD)/sandbox/Dockerfile
	docker build -q --force-rm --network none --build-arg BASE_IMAGE=$(BASE_IMAGE) $(IMAGE_LABELS) \
	  -t $(SANDBOX_IMAGE) $(BUILD)/sandbox >/dev/null
	@echo "sandbox image $(SANDBOX_IMAGE): built (wire version $(WIRE_VERSION))"
	cp images/numpy/Dockerfile $(BUILD)/numpy/Dockerfile
	docker build -q --force-rm --network none --build-arg SANDBOX_IMAGE=$(SANDBOX_IMAGE) $(IMAGE_LABELS) \
	  -t $(NUMPY_IMAGE) $(BUILD)/numpy >/dev/null
	@echo "numpy image $(NUMPY_IMAGE): built (wire version $(WIRE_VERSION))"
	@docker image prune -f --filter label=io.sandbox-executor.image >/dev/null

.PHONY: runsc
runsc: ## Install gVisor (Debian's runsc) and register it with the engine (root)
	scripts/install-runsc.sh

.PHONY: demo
demo: images ## Build everything, then run the examples: one task, then FedAvg across two pods
	$(VENV)/bin/sandbox-executor run examples/protocols/column_stats --data examples/data/hospital_a \
	  --project demo --task-hash column-stats-demo --param columns='["age","systolic_bp"]'
	$(VENV)/bin/sandbox-executor tasks --project demo --limit 1
	$(VPY) examples/fedavg_demo.py --rounds 10

.PHONY: test
test: check images runsc ## Build everything and run the whole test suite (runc and gVisor)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: $(STAMP) ## Only the tests that need no Docker (half a minute, on 2 workers)
	$(VENV)/bin/pytest tests/unit -n 2 $(PYTEST_ARGS)

.PHONY: test-integration
test-integration: images runsc ## The tests against a real Docker engine and the real images
	$(VENV)/bin/pytest tests/integration $(PYTEST_ARGS)

.PHONY: test-security
test-security: images runsc ## The probes run inside a real sandbox (runc and gVisor)
	$(VENV)/bin/pytest tests/security $(PYTEST_ARGS)

# Extra arguments for bench/report.py, e.g. BENCH_ARGS=--quick (a smoke run, kept out of BENCHMARKS.md).
BENCH_ARGS ?=

.PHONY: bench
bench: images ## Run every benchmark (about 4 min, Docker; runsc if installed) and write BENCHMARKS.md
	$(VPY) bench/report.py $(BENCH_ARGS)

.PHONY: clean
clean: ## Remove build output (not the images)
	rm -rf $(BUILD) .pytest_cache .mypy_cache .ruff_cache
