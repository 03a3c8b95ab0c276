# Two entry points, each doing all set-up on a fresh machine (virtual environment, dependencies,
# the package): `make demo` runs the main job, `make test` runs lint and the test suite.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
# vlkernels._C (csrc/) is built when nvcc is found; torch guesses CUDA_HOME=/usr/local otherwise
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2
# the GPU machine's Triton (see ../shared/NOTES.md): tests/test_kernels_compile.py compiles every kernel with it too
GPU_TRITON ?= triton==3.6.0
export VLK_GPU_TRITON_PATH ?= $(abspath $(VENV))/gpu-triton
# the oldest transformers setup.py admits (with the hub release it needs): the patched-model tests run
# against it as well as against the newest
TF_OLDEST ?= transformers==5.17.0 huggingface-hub==1.5.0 httpx anyio httpcore h11 idna certifi sniffio
TF_OLDEST_PATH ?= $(abspath $(VENV))/tf-oldest
PATCH_TESTS := tests/test_patch.py tests/test_generate.py tests/test_patch_families.py

$(VENV)/.installed: setup.py Makefile $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	# open_flamingo pins torch==2.0.1: install it without its dependencies (tests load helpers.py)
	$(PY) -m pip install -q --no-deps open-flamingo==2.0.1
	$(PY) -m pip install -q --no-deps --upgrade --target $(VLK_GPU_TRITON_PATH) $(GPU_TRITON)
	$(PY) -m pip install -q --no-deps --upgrade --target $(TF_OLDEST_PATH) $(TF_OLDEST)
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m vlkernels.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q --durations=15 tests
	PYTHONPATH=$(TF_OLDEST_PATH) $(PY) -m pytest -q $(PATCH_TESTS)
