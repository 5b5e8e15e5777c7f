# All set-up lives here; see README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL_DIR := model-store/tiny-llama

.PHONY: install test model bench-kernels clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The default model, written deterministically (config.json last, so it marks a finished build).
$(MODEL_DIR)/config.json: scripts/make_model.py | $(STAMP)
	$(PY) scripts/make_model.py --out $(MODEL_DIR)

model: $(MODEL_DIR)/config.json

test: $(STAMP)
	$(PY) -m pytest -q

# Triton kernel timings vs SDPA; on a machine without a GPU it says so and exits 0.
bench-kernels: $(STAMP)
	$(PY) bench/triton_kernels.py

clean:
	rm -rf $(VENV) model-store/tiny-llama model-store/*.mar

# Serving targets (mar, serve, bench-serve) and benchmark targets (bench, ...) live beside their code.
-include handler/handler.mk
-include bench/bench.mk
