# Serving targets (included by the top-level Makefile, which defines PY, STAMP, MODEL_DIR, model).
# They serve the default model, SmolLM2-135M-Instruct (make model), as `llm`.
VENV_BIN := $(dir $(PY))
MAR := model-store/llm.mar
TS_LOG_DIR := logs

.PHONY: mar serve serve-stop bench-serve soak

$(MAR): $(STAMP) handler/ts_entry.py model-config.yaml $(wildcard $(MODEL_DIR)/*)
	test -f $(MODEL_DIR)/config.json || $(MAKE) model
	$(VENV_BIN)torch-model-archiver --model-name llm --version 1.0 \
	    --handler handler/ts_entry.py --config-file model-config.yaml \
	    --extra-files $(MODEL_DIR) --export-path model-store --force
	@echo "built $(MAR)"

mar: $(MAR)

# Foreground TorchServe on 127.0.0.1 with the shipped config.properties (Ctrl-C stops it).
serve: $(MAR)
	@mkdir -p $(TS_LOG_DIR)
	@echo "TorchServe: inference http://127.0.0.1:8080  management :8081  metrics :8082  gRPC :7070/:7071"
	@echo "Token authorization is on: keys are written to ./key_file.json once the server starts. Try:"
	@echo '  KEY=$$($(PY) -c "import json;print(json.load(open(\"key_file.json\"))[\"inference\"][\"key\"])")'
	@echo '  curl -s -H "Authorization: Bearer $$KEY" -H "Content-Type: application/json" http://127.0.0.1:8080/predictions/llm -d '"'"'{"prompt": "Photosynthesis is the process by which", "max_tokens": 24, "temperature": 0}'"'"
	@echo '  curl -sN -H "Authorization: Bearer $$KEY" -H "Content-Type: application/json" http://127.0.0.1:8080/predictions/llm/1.0/v1/chat/completions -d '"'"'{"model": "llm", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32, "temperature": 0, "stream": true}'"'"
	PATH="$(abspath $(VENV_BIN)):$$PATH" PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" LOG_LOCATION=$(TS_LOG_DIR) METRICS_LOCATION=$(TS_LOG_DIR) \
	    $(VENV_BIN)torchserve --start --foreground --ncs --model-store model-store --models llm=llm.mar \
	    --ts-config config.properties

serve-stop:
	$(VENV_BIN)torchserve --stop

# Same workload as the engine benchmark, through TorchServe; prints where a served token's time goes
# and writes bench/results/serve.json. BENCH_SERVE_ARGS="--stream-interval 4" (or --repeats, --workload).
BENCH_SERVE_ARGS ?=
bench-serve: $(MAR)
	PATH="$(abspath $(VENV_BIN)):$$PATH" PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
	    $(PY) bench/serve.py --mar $(MAR) --model $(MODEL_DIR) --out bench/results/serve.json $(BENCH_SERVE_ARGS)

# Soak (not part of `make test`, a few minutes): >= 500 mixed requests through TorchServe with the
# shipped config.properties and model-config.yaml; prints a table, writes bench/results/soak.json,
# exits non-zero if any check fails. SOAK_ARGS="--requests 1000 --concurrency 16" to change the load.
SOAK_ARGS ?=
soak: $(STAMP)
	test -f $(MODEL_DIR)/config.json || $(MAKE) --no-print-directory model
	PATH="$(abspath $(VENV_BIN)):$$PATH" PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" \
	    $(PY) bench/soak.py --model $(MODEL_DIR) --out bench/results/soak.json $(SOAK_ARGS)
