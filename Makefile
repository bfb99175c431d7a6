# joenet: `make train` trains on the built-in synthetic volume, `make test` runs the test suite.
# Both create .venv and install joenet into it first.

PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?=
PY := $(VENV)/bin/python
# Installed only when the venv has no torch yet: a CUDA torch you put there (or see through
# VENV_ARGS=--system-site-packages) is kept. On machines with a local CPU wheel pip takes it.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.joenet-installed
DEV_STAMP := $(VENV)/.joenet-dev-installed
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install train test lint format bench bench-gpu gpu-wheels clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

# Test and lint tools, readers for the converter, Dask, notebooks: only what `make test` needs.
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

install: $(DEV_STAMP) ## Create .venv and install joenet (editable) with its dev tools

train: $(STAMP) ## Train on the synthetic volume (CPU demo preset when there is no CUDA GPU)
	$(PY) -m joenet.train $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else 'preset=cpu_demo')") $(ARGS)

# Test processes (pytest-xdist): most of a test's time is single-threaded (imports, subprocess
# start-up), so two processes fill CI's 2 cores; tests/conftest.py splits torch's threads among
# them. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: $(DEV_STAMP) lint ## Lint, then run the whole test suite (what CI runs)
	$(PY) -m pytest -n $(TEST_WORKERS) $(ARGS)

lint: $(DEV_STAMP) ## ruff lint and format check, mypy over src (settings: pyproject.toml)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

format: $(DEV_STAMP) ## Format and autofix with ruff
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

# torch-em without its dependencies: they pull torchvision, which does not install beside the
# CPU torch; its UNet2d needs only torch (benchmarks/train_step_bench.py).
bench: $(DEV_STAMP) ## Run the benchmarks against their peers (~2.5 h on 2 CPU cores; not in the tests)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m pip install --quiet --no-deps torch-em
	$(PY) benchmarks/model_figures.py
	$(PY) benchmarks/augment_bench.py
	$(PY) benchmarks/train_step_bench.py
	$(PY) benchmarks/pipeline_bench.py
	$(PY) benchmarks/data_bench.py
	$(PY) benchmarks/predict_bench.py
	$(PY) benchmarks/recipe_ablation.py --out recipe_ablation
	$(PY) benchmarks/time_to_accuracy.py --out time_to_accuracy

# One table for a new (GPU) machine: training step, data pipeline, prediction against MONAI, DDP.
bench-gpu: $(DEV_STAMP) ## Check speed on this machine's GPU (CPU: a tiny smoke run); writes gpu_check.md/.csv
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/gpu_check.py $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--tiny --ddp-on-cpu')") --out gpu_check $(ARGS)

# A GPU machine without network (the device tool's): fetch here what its image lacks, then run
# there `sh benchmarks/gpu_check_offline.sh .whl gpu_check` (benchmarks/offline_wheels.py).
gpu-wheels: $(STAMP) ## Download, for an offline GPU machine, the wheels its image lacks (.whl/)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/offline_wheels.py --dest .whl $(ARGS)

clean: ## Remove the venv, caches and build outputs (keeps logs/ and data/)
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache src/*.egg-info
