# Two entry points, each doing all set-up on a fresh machine (virtual environment, dependencies,
# the package): `make demo` runs the main job, `make test` runs lint and the test suite.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.14.1 torchvision==0.29.1
# vlkernels._C (csrc/) is built when nvcc is found; torch guesses CUDA_HOME=/usr/local otherwise
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2
# the GPU machine's Triton (3.6.0): tests/test_kernels_compile.py compiles every kernel with it too
GPU_TRITON ?= triton==3.6.0
export VLK_GPU_TRITON_PATH ?= $(abspath $(VENV))/gpu-triton
# the oldest transformers setup.py admits (with the hub release it needs): the patched transformers
# models' tests run against it as well as against the newest (OLDEST_K: not open_clip's and
# open_flamingo's models, which do not import transformers, and float16 where bfloat16 runs too)
TF_OLDEST ?= transformers==5.17.0 huggingface-hub==1.5.0 httpx anyio httpcore h11 idna certifi sniffio
TF_OLDEST_PATH ?= $(abspath $(VENV))/tf-oldest
PATCH_TESTS := tests/test_patch.py tests/test_generate.py tests/test_patch_families.py
OLDEST_K := not open_clip and not open_flamingo and not coca_pooler and not torch.float16
# pytest-xdist workers (auto: one per core)
TEST_WORKERS ?= auto

# vlkernels._C is built apart from the install (in place, where setup.py finds nvcc): for `make test`,
# whose checks read the build, and for `make demo` only on a machine with a GPU. Without one the
# extension could not run (the demo runs the Triton interpreter), and nvcc was most of a fresh CPU
# machine's `make demo` (49 minutes under load).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

$(VENV)/.installed: setup.py Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	VLK_SKIP_CUDA_BUILD=1 $(PY) -m pip install -q --no-build-isolation -e ".[test,bench]"
	# open_flamingo pins torch==2.0.1: install it without its dependencies (tests load helpers.py)
	$(PY) -m pip install -q --no-deps open-flamingo==2.0.1
	$(PY) -m pip install -q --no-deps --upgrade --target $(VLK_GPU_TRITON_PATH) $(GPU_TRITON)
	$(PY) -m pip install -q --no-deps --upgrade --target $(TF_OLDEST_PATH) $(TF_OLDEST)
	touch $@

# `make gpu-prep`: the GPU session's bundle (benchmarks/gpu_session.sh), prepared here with the GPU
# machine's versions: vlkernels._C built for its Python 3.12 and torch 2.11.0+cu130 (sm_90a), the
# peer wheels in .whl/, the commit in .whl/COMMIT and the csrc/ digest in .whl/CSRC (the session's
# install step refuses a _C built from other sources); then the script's DRY rehearsal in that
# environment (numpy 2.2.6 over its 2.5 for the rehearsal only: Triton 3.6's interpreter fails with
# numpy >= 2.4; the device never runs the interpreter). The device call carries
# vlkernels/_C.cpython-312-x86_64-linux-gnu.so and .whl.
GPU_VENV ?= .venv-gpu
GPU_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
GPU_VERSIONS ?= torch==2.11.0 torchvision==0.26.0 triton==3.6.0 "numpy==2.5.*" transformers==5.17.0 timm \
	pytest pytest-xdist pybind11 ninja setuptools wheel
GPU_REHEARSAL ?= /tmp/vlkernels-gpu-rehearsal

$(GPU_VENV)/.installed:
	$(GPU_PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q $(GPU_VERSIONS)
	$(GPU_VENV)/bin/python -m pip install -q --target $(GPU_VENV)/numpy-interpreter numpy==2.2.6
	touch $@

$(VENV)/.cuda-ext: $(VENV)/.installed $(wildcard csrc/*)
	$(PY) setup.py -q build_ext --inplace
	touch $@

.PHONY: install demo test lint gpu-prep
install: $(VENV)/.installed

demo: $(VENV)/.installed $(if $(HAS_GPU),$(VENV)/.cuda-ext)
	$(PY) -m vlkernels.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint $(VENV)/.cuda-ext
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=40 tests
	PYTHONPATH=$(TF_OLDEST_PATH) $(PY) -m pytest -q -n $(TEST_WORKERS) $(PATCH_TESTS) -k "$(OLDEST_K)"

gpu-prep: $(GPU_VENV)/.installed
	VLK_CUDA_ARCHS=90a $(GPU_VENV)/bin/python setup.py -q build_ext --inplace
	bash benchmarks/fetch_wheels.sh
	git rev-parse --short HEAD > .whl/COMMIT
	bash benchmarks/gpu_session.sh __step csrc_digest > .whl/CSRC  # the digest the session's install step compares
	rm -rf $(GPU_REHEARSAL)
	DRY=1 OUT=$(GPU_REHEARSAL) PYTHON=$(GPU_VENV)/bin/python PYTHONPATH=$(abspath $(GPU_VENV))/numpy-interpreter \
		bash benchmarks/gpu_session.sh
