"""LLMEngine: add_request / abort_request / step over the scheduler, model runner and sampler."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from paged import beam_search
from paged.block_manager import BlockManager
from paged.config import EngineConfig
from paged.detokenizer import Detokenizer
from paged.errors import EngineOverloadedError
from paged.model_runner import DTYPES, ModelRunner
from paged.models.llama import ModelArgs
from paged.outputs import CompletionOutput, RequestOutput
from paged.sampler import Sampler
from paged.sampling_params import SamplingParams
from paged.scheduler import PreemptionCostModel, Scheduler
from paged.sequence import Sequence, SequenceGroup, SequenceStatus

DEFAULT_KV_CACHE_BYTES = 1 << 30


def _eos_token_ids(model_dir: str, args: ModelArgs, tokenizer) -> list[int]:
    ids = list(args.eos_token_ids)
    generation_config = Path(model_dir) / "generation_config.json"
    if generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids += [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


class LLMEngine:
    def __init__(self, config: EngineConfig):
        if config.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not available in this build (see README: roadmap)")
        self.config = config
        self.model_args = ModelArgs.from_checkpoint(config.model)
        args = self.model_args
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.vocab_size = args.vocab_size
        limit = args.max_position_embeddings
        if args.sliding_window:
            limit = min(limit, args.sliding_window)  # beyond it the full-attention result would differ
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit {limit}")
        self.max_model_len = config.max_model_len or limit
        element_size = torch.tensor([], dtype=DTYPES[config.dtype]).element_size()
        block_bytes = args.kv_bytes_per_token * element_size * config.block_size
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            num_blocks = (config.kv_cache_memory_bytes or DEFAULT_KV_CACHE_BYTES) // block_bytes
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory_bytes {config.kv_cache_memory_bytes} holds no block "
                                 f"of {block_bytes} bytes")
        num_cpu_blocks = config.swap_space_bytes // block_bytes
        self.block_manager = BlockManager(num_blocks, num_cpu_blocks, config.block_size,
                                          config.enable_prefix_caching)
        num_params = args.num_layers * (args.hidden_size * (args.num_heads + 2 * args.num_kv_heads) * args.head_dim
                                        + args.num_heads * args.head_dim * args.hidden_size
                                        + 3 * args.hidden_size * args.intermediate_size)
        cost_model = PreemptionCostModel(flops_per_token=2.0 * num_params, block_bytes=block_bytes)
        self.scheduler = Scheduler(config, self.block_manager, cost_model)
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, args, num_blocks, num_cpu_blocks)
        self.eos_token_ids = _eos_token_ids(config.model, args, self.tokenizer)
        self.sampler = Sampler(self.eos_token_ids)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, SequenceGroup] = {}
        self._next_seq_id = 0
        self._num_requests_added = 0
        self.num_steps = 0
        self.num_prompt_tokens_total = 0
        self.num_generated_tokens_total = 0
        self._utilization_sum = 0.0
        self._utilization_steps = 0

    # ---- requests -----------------------------------------------------------------------------
    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, self.tokenizer(prompt).input_ids
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError("prompt must be a non-empty string or a non-empty list of token ids")
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise ValueError(f"prompt token id {token!r} is outside the vocabulary [0, {self.vocab_size})")
        return None, list(prompt)

    def _check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        total = num_prompt_tokens + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds max_model_len {self.max_model_len} by {total - self.max_model_len}")
        bs = self.block_manager.block_size
        # The prompt's blocks are shared; every sample may own its generated blocks plus one copy.
        needed = -(-num_prompt_tokens // bs) + params.num_seqs * (-(-params.max_tokens // bs) + 1)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"request needs up to {needed} KV blocks but the whole pool has "
                             f"{self.block_manager.num_blocks} (short by {needed - self.block_manager.num_blocks})")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError for bad input (nothing is queued then) and
        EngineOverloadedError when ``max_waiting_requests`` requests already wait."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self._tokenize(prompt)
        self._check_fits(len(token_ids), params)
        if self.scheduler.num_waiting_requests >= self.config.max_waiting_requests:
            raise EngineOverloadedError(f"{self.config.max_waiting_requests} requests are already waiting")
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else \
                hash((self.config.seed, self._num_requests_added)) & (2**63 - 1)
            generator = torch.Generator().manual_seed(seed)
        arrival = time.time() if arrival_time is None else arrival_time
        deadline = arrival + self.config.request_timeout_s if self.config.request_timeout_s else None
        group = SequenceGroup(request_id, text, token_ids, params, self._new_seq_id(), arrival, generator, deadline)
        self._num_requests_added += 1
        self.requests[request_id] = group
        self.scheduler.add(group)

    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id

    def abort_request(self, request_id: str) -> None:
        """Drop the request and free its blocks; it gets no further output. Unknown ids are ignored."""
        group = self.requests.pop(request_id, None)
        if group is not None:
            self.scheduler.remove_group(group)
            for seq in group.seqs:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, seq.finish_reason or "abort"

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run the model, sample, detokenize; outputs of requests that
        produced tokens or finished."""
        touched: dict[str, SequenceGroup] = {}
        self._expire_deadlines(touched)
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return [self._make_output(g) for g in touched.values()]
        self.num_steps += 1
        cache = self.runner.kv_cache
        cache.swap_out(sched.swap_out)
        cache.swap_in(sched.swap_in)
        cache.copy_blocks(sched.copies)
        tables = [self.block_manager.block_table(item.seq.seq_id) for item in sched.scheduled]
        logits = self.runner.execute(sched.scheduled, tables)
        sampling = []
        for item in sched.scheduled:
            seq = item.seq
            if item.samples:
                sampling.append(seq)
            computed_before = seq.num_computed_tokens
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            self.num_prompt_tokens_total += max(0, min(seq.num_prompt_tokens, seq.num_computed_tokens)
                                                - computed_before)
        now = time.time()
        beam_rows: dict[str, list[tuple[Sequence, int]]] = {}
        sample_rows = []
        for row, seq in enumerate(sampling):
            if seq.group.metrics.first_token_time is None:
                seq.group.metrics.first_token_time = now
            if seq.group.params.use_beam_search:
                beam_rows.setdefault(seq.group.request_id, []).append((seq, row))
            else:
                sample_rows.append(row)
        for items in beam_rows.values():
            self._beam_step(items[0][0].group, [seq for seq, _ in items], logits[[row for _, row in items]])
            touched[items[0][0].group.request_id] = items[0][0].group
        if sample_rows:
            sampling = [sampling[row] for row in sample_rows]
            logits = logits[sample_rows] if len(sample_rows) != logits.shape[0] else logits
            counts = [seq.group.params.num_seqs if not seq.group.forked else 1 for seq in sampling]
            results = self.sampler.sample(logits, sampling, counts)
            for seq, result in zip(sampling, results):
                group = seq.group
                targets = [seq]
                if not group.forked:
                    group.forked = True
                    for _ in result.token_ids[1:]:
                        child = seq.fork(self._new_seq_id())
                        group.seqs.append(child)
                        self.scheduler.add_forked(seq, child)
                        targets.append(child)
                for target, token, logprob, top in zip(targets, result.token_ids, result.chosen_logprobs,
                                                       result.logprobs):
                    self._append_token(target, token, logprob, top)
                touched[group.request_id] = group
        self._record_utilization()
        # A beam request's best beams change from step to step: it reports once, when finished.
        return [self._make_output(g) for g in touched.values()
                if g.is_finished or not g.params.use_beam_search]

    def _append_token(self, seq: Sequence, token: int, logprob: float, top: dict[int, float]) -> None:
        params = seq.group.params
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if params.logprobs is not None:
            seq.logprobs.append(top)
        self.num_generated_tokens_total += 1
        reason = None
        is_stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        if is_stop_token and seq.num_output_tokens > params.min_tokens - 1:
            reason = "stop"
        elif self.detokenizer.append_token(seq, params.stop if seq.num_output_tokens >= params.min_tokens else []):
            reason = "stop"  # stop strings count only from min_tokens on (before, the text is kept whole)
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            seq.status = SequenceStatus.FINISHED
            self.scheduler.finish(seq)

    def _beam_step(self, group: SequenceGroup, beams: list[Sequence], logits: torch.Tensor) -> None:
        """Advance the beams of one request that were scored this step (usually all of them)."""
        params = group.params
        group.forked = True
        waiting_beams = [s for s in group.seqs if not s.is_finished and s not in beams]
        num_keep = params.beam_width - len(waiting_beams)
        end_tokens = set() if params.ignore_eos else set(self.eos_token_ids) | set(params.stop_token_ids)
        scores = torch.tensor([s.cumulative_logprob for s in beams], dtype=torch.float64)
        continuing, ending = beam_search.select_candidates(scores, torch.log_softmax(logits, dim=-1),
                                                           num_keep, end_tokens)
        for candidate in ending:  # a finished hypothesis holds no blocks
            hypothesis = beams[candidate.parent].fork(self._new_seq_id())
            hypothesis.token_ids.append(candidate.token)
            hypothesis.cumulative_logprob = candidate.score
            hypothesis.status, hypothesis.finish_reason = SequenceStatus.FINISHED, "stop"
            group.seqs.append(hypothesis)
        # Fork every extra child before any parent is extended; drop parents nobody continues.
        targets: dict[int, list[Sequence]] = {}
        for candidate in continuing:
            parent = beams[candidate.parent]
            if candidate.parent in targets:
                child = parent.fork(self._new_seq_id())
                group.seqs.append(child)
                self.scheduler.add_forked(parent, child)
                targets[candidate.parent].append(child)
            else:
                targets[candidate.parent] = [parent]
        for index, beam in enumerate(beams):
            if index not in targets:
                self.scheduler.finish(beam)
                group.seqs.remove(beam)
        used = {index: 0 for index in targets}
        for candidate in continuing:
            beam = targets[candidate.parent][used[candidate.parent]]
            used[candidate.parent] += 1
            beam.token_ids.append(candidate.token)
            beam.cumulative_logprob = candidate.score
            self.num_generated_tokens_total += 1
            self.detokenizer.append_token(beam, [])
            if beam.num_output_tokens >= params.max_tokens or beam.num_tokens >= self.max_model_len:
                beam.status, beam.finish_reason = SequenceStatus.FINISHED, "length"
                self.scheduler.finish(beam)
        live = [s for s in group.seqs if not s.is_finished]
        finished = [beam_search.normalized_score(s.cumulative_logprob, self._generated_length(s),
                                                 params.length_penalty) for s in group.seqs if s.is_finished]
        if live:
            best_running = max(beam_search.normalized_score(s.cumulative_logprob, self._generated_length(s),
                                                            params.length_penalty) for s in live)
            if beam_search.search_is_done(finished, best_running, params.beam_width):
                for beam in live:
                    self.scheduler.finish(beam)
                    group.seqs.remove(beam)

    def _generated_length(self, seq: Sequence) -> int:
        """Generated tokens, not counting a final end token (how hypotheses are length-normalized)."""
        ends_with_stop = seq.finish_reason == "stop" and seq.num_output_tokens > 0
        return seq.num_output_tokens - int(ends_with_stop)

    def _expire_deadlines(self, touched: dict[str, SequenceGroup]) -> None:
        now = time.time()
        for group in [g for g in self.requests.values() if g.deadline is not None and now > g.deadline]:
            self.scheduler.remove_group(group)
            for seq in group.seqs:
                if not seq.is_finished:
                    seq.status, seq.finish_reason = SequenceStatus.FINISHED, "timeout"
            touched[group.request_id] = group

    def _make_output(self, group: SequenceGroup) -> RequestOutput:
        params = group.params
        finished = group.is_finished
        seqs = group.seqs
        if finished and params.use_beam_search:
            seqs = sorted(seqs, reverse=True, key=lambda s: beam_search.normalized_score(
                s.cumulative_logprob, self._generated_length(s), params.length_penalty))
        elif finished and len(seqs) > params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        outputs = [
            CompletionOutput(index=i, text=self.detokenizer.visible_text(seq, params.stop),
                             token_ids=seq.output_token_ids, cumulative_logprob=seq.cumulative_logprob,
                             logprobs=list(seq.logprobs) if params.logprobs is not None else None,
                             finish_reason=seq.finish_reason)
            for i, seq in enumerate(seqs[:params.n])
        ]
        if finished:
            group.metrics.finished_time = time.time()
            self.requests.pop(group.request_id, None)
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=outputs, finished=finished,
                             metrics=group.metrics, num_cached_tokens=group.num_cached_tokens)

    # ---- statistics ---------------------------------------------------------------------------
    def _record_utilization(self) -> None:
        """Live token slots / allocated token slots of the blocks held by sequences, after the step."""
        bm = self.block_manager
        used_blocks = bm.num_blocks - bm.num_free_blocks
        if used_blocks == 0:
            return
        allocated = used_blocks * bm.block_size
        waste = sum(len(bm.block_table(seq.seq_id)) * bm.block_size - seq.num_computed_tokens
                    for seq in self.scheduler.running)
        self._utilization_sum += max(0, allocated - waste) / allocated
        self._utilization_steps += 1

    def kv_stats(self) -> dict:
        bm = self.block_manager
        scheduler = self.scheduler
        used_blocks = bm.num_blocks - bm.num_free_blocks
        live = sum(seq.num_computed_tokens for seq in scheduler.running)
        return {
            "num_blocks": bm.num_blocks,
            "block_size": bm.block_size,
            "free_blocks": bm.num_free_blocks,
            "cached_free_blocks": bm.prefix_cache.num_evictable,
            "used_blocks": used_blocks,
            "used_token_slots": used_blocks * bm.block_size,
            "live_tokens": live,
            "kv_usage": used_blocks / bm.num_blocks,
            "num_cpu_blocks": bm.num_cpu_blocks,
            "free_cpu_blocks": bm.num_free_cpu_blocks,
            "prefix_queries": bm.prefix_cache.queried_tokens,
            "prefix_hits": bm.prefix_cache.hit_tokens,
            "prefix_hit_rate": bm.prefix_cache.hit_rate,
            "num_running": len(scheduler.running),
            "num_waiting": len(scheduler.waiting),
            "num_swapped": sum(len(g.seqs_with_status(SequenceStatus.SWAPPED)) for g in scheduler.swapped),
            "num_recompute_preemptions": scheduler.num_recompute_preemptions,
            "num_swap_preemptions": scheduler.num_swap_preemptions,
            "num_steps": self.num_steps,
            "prompt_tokens_total": self.num_prompt_tokens_total,
            "generated_tokens_total": self.num_generated_tokens_total,
            "mean_kv_utilization": (self._utilization_sum / self._utilization_steps
                                    if self._utilization_steps else 1.0),
            # The sum and count behind the mean, so a caller can take the mean over any window.
            "kv_utilization_sum": self._utilization_sum,
            "kv_utilization_steps": self._utilization_steps,
        }
