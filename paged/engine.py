"""LLMEngine: add_request / abort_request / step over the scheduler, model runner and decoder.

A step is one pipeline: ``Scheduler.schedule()`` -> plan -> ``ModelRunner.execute(plan)`` ->
logits -> ``Decoder.decide`` -> ``Scheduler.update_from_output`` -> detokenize -> outputs.

Faults stay with the requests they touch: a row without a usable token fails its request; an
exception while running a plan fails the requests of that plan (their blocks go back to the pool)
and the engine serves on. Only ``MAX_CONSECUTIVE_STEP_FAULTS`` failed steps in a row make ``step``
raise ``EngineDeadError``: then the engine cannot go on and its owner should restart it.

The model runs behind the ``Executor`` protocol (paged/executor.py): in this process, or on
tensor-parallel ranks (docs/tensor_parallel.md); the scheduler, block manager and sampler stay
here. When the executor fails (``ExecutorFailedError``) its KV cache is gone: every request
holding KV fails, the pool is reset and the executor restarts before the next step
(``_recover_from_lost_executor``). ``close()`` shuts the executor down.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from paged import block_size_profile, decoding
from paged.backends import resolve_attention_backend
from paged.config import EngineConfig
from paged.decoding import Decoder
from paged.detokenizer import Detokenizer
from paged.errors import (EngineDeadError, EngineOverloadedError, ExecutorFailedError, InvalidRequestError,
                          RequestFailedError)
from paged.executor import make_executor
from paged.model_runner import DTYPES
from paged.models.llama import ModelArgs
from paged.outputs import CompletionOutput, FinishReason, RequestOutput
from paged.sampler import Sampler
from paged.sampling_params import SamplingParams
from paged.kv_sizing import plan_kv_cache, preemption_cost_model
from paged.scheduler import Scheduler, SchedulerOutput
from paged.sequence import Sequence, SequenceGroup, SequenceStatus
from paged.shared_prefixes import SharedPrefixRegistry
from paged.stats import kv_stats_dict
from paged.step_timer import StepTimer

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAULTS = 3


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
        self.config = config
        self.model_args = args = ModelArgs.from_checkpoint(config.model)
        self.block_size_choice: block_size_profile.BlockSizeChoice | None = None
        if config.block_size == "auto":
            self.block_size_choice = block_size_profile.choose_at_start(config.block_size_profile,
                                                                        self._measure_attention_cost)
            self.config = config = dataclasses.replace(config, block_size=self.block_size_choice.block_size)
            logger.info("block_size auto: %d (%s)", config.block_size, self.block_size_choice.reason)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.vocab_size = args.vocab_size
        limit = args.max_position_embeddings
        if args.sliding_window:
            limit = min(limit, args.sliding_window)  # beyond it the full-attention result would differ
        if config.max_model_len is not None and config.max_model_len > limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit {limit}")
        self.max_model_len = config.max_model_len or limit
        layout = plan_kv_cache(config, args)
        self.eos_token_ids = _eos_token_ids(config.model, args, self.tokenizer)
        self.scheduler = Scheduler(config, layout, preemption_cost_model(args, layout), self.eos_token_ids,
                                   self.max_model_len)
        torch.manual_seed(config.seed)
        self.timer = StepTimer()
        self.executor = make_executor(config, args, layout, self.timer)
        self.decoder = Decoder(Sampler(self.eos_token_ids), self.eos_token_ids, self._new_seq_id)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, SequenceGroup] = {}
        self._next_seq_id = 0
        self._num_requests_added = 0
        self.num_steps = 0
        self.num_generated_tokens_total = 0
        self.num_step_faults = 0
        self._consecutive_step_faults = 0
        self.first_fault: str | None = None
        self._restart_executor = False
        self.closed = False
        self.prefixes = SharedPrefixRegistry()
        self.length_profile = block_size_profile.LengthProfile()
        self._attention_cost_s: dict[int, float] | None = None

    def close(self) -> None:
        """Shut the executor down (tensor-parallel ranks stop; in process there is nothing to stop).
        Idempotent; ``step`` raises EngineDeadError afterwards."""
        self.closed = True
        self.executor.shutdown()

    # ---- requests -----------------------------------------------------------------------------
    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "prompt must not be empty")
            return prompt, self.tokenizer(prompt).input_ids
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequestError("prompt", "prompt must be a non-empty string or a non-empty list of token ids")
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise InvalidRequestError("prompt", f"prompt token id {token!r} is outside the vocabulary "
                                                    f"[0, {self.vocab_size})")
        return None, list(prompt)

    def _check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        total = num_prompt_tokens + params.max_tokens
        if num_prompt_tokens >= self.max_model_len:
            raise InvalidRequestError("prompt", f"prompt ({num_prompt_tokens} tokens) leaves no room to generate "
                                                f"within max_model_len {self.max_model_len}")
        if total > self.max_model_len:
            raise InvalidRequestError("max_tokens", f"prompt ({num_prompt_tokens} tokens) + max_tokens "
                                                    f"({params.max_tokens}) = {total} exceeds max_model_len "
                                                    f"{self.max_model_len} by {total - self.max_model_len}")
        if params.num_seqs > self.config.max_num_seqs:
            param = "beam_width" if params.use_beam_search else ("best_of" if params.best_of > params.n else "n")
            raise InvalidRequestError(param, f"the request runs {params.num_seqs} sequences at once but the engine "
                                             f"runs at most max_num_seqs={self.config.max_num_seqs}")
        bad_stop_ids = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stop_ids:
            raise InvalidRequestError("stop_token_ids", f"stop token id {bad_stop_ids[0]} is outside the "
                                                        f"vocabulary [0, {self.vocab_size})")
        self.scheduler.check_fits(num_prompt_tokens, params)

    def validate_request(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        """Everything ``add_request`` checks about the request itself, without queueing it:
        returns (prompt text or None, prompt token ids) or raises InvalidRequestError."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(None, f"params must be SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        self._check_fits(len(token_ids), params)
        return text, token_ids

    def can_accept_request(self) -> bool:
        """Would ``add_request`` find room in the waiting queue now?"""
        return self.scheduler.num_waiting_requests < self.config.max_waiting_requests

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None, stream: bool = True) -> None:
        """Queue a request. Raises InvalidRequestError (a ValueError) for bad input (nothing is
        queued then) and EngineOverloadedError when ``max_waiting_requests`` requests already wait.
        ``stream=False``: ``step`` reports the request only once, when it is finished."""
        if request_id in self.requests:
            raise InvalidRequestError(None, f"request id {request_id!r} is already in use")
        if not self.can_accept_request():
            raise EngineOverloadedError(f"{self.config.max_waiting_requests} requests are already waiting")
        text, token_ids = self.validate_request(prompt, params)
        self._queue(request_id, text, token_ids, params, arrival_time, stream)

    def _queue(self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams,
               arrival_time: float | None, stream: bool, internal: bool = False) -> None:
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else \
                hash((self.config.seed, self._num_requests_added)) & (2**63 - 1)
            generator = torch.Generator().manual_seed(seed)
        arrival = time.time() if arrival_time is None else arrival_time
        deadline = arrival + self.config.request_timeout_s if self.config.request_timeout_s else None
        group = SequenceGroup(request_id, text, token_ids, params, self._new_seq_id(), arrival, generator,
                              deadline, stream, internal)
        self._num_requests_added += 1
        self.requests[request_id] = group
        self.scheduler.add(group)

    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id

    def abort_request(self, request_id: str) -> None:
        """Drop the request (waiting, running or swapped) and free its blocks; it gets no further
        output. Unknown ids are ignored."""
        group = self.requests.pop(request_id, None)
        if group is not None:
            self._end_group(group, FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration; returns the outputs of requests that produced text or finished
        (a ``stream=False`` request only when finished)."""
        if self.closed:
            raise EngineDeadError("the engine was closed")
        if self._restart_executor:
            self._restart()
        touched = self._expire_deadlines()
        ready = self._check_executor(touched)
        with self.timer.phase("schedule"):
            plan = self.scheduler.schedule() if ready else SchedulerOutput()
        if not plan.is_empty:
            self.num_steps += 1
            try:
                logits = self.executor.execute(plan)
                with self.timer.phase("sample"):
                    decisions = self.decoder.decide(plan.sampling_seqs, logits)
            except ExecutorFailedError as exc:
                self._recover_from_lost_executor(exc, touched)
            except Exception as exc:  # noqa: BLE001 - the plan's requests fail, the engine goes on
                self._fail_plan(plan, exc, touched)
            else:
                self._consecutive_step_faults = 0
                with self.timer.phase("outputs"):
                    grown = self.scheduler.update_from_output(plan, decisions)
                    self.num_generated_tokens_total += len(grown)
                    for group, error in decisions.failed.values():
                        self._end_group(group, FinishReason.ERROR, error)
                        touched[group.request_id] = group
                    self._detokenize(grown, touched)
                self.scheduler.record_kv_usage()
        with self.timer.phase("outputs"):
            outputs = [self._make_output(g) for g in touched.values() if g.stream or g.is_finished]
        self.timer.step_done()
        return outputs

    def _detokenize(self, seqs: list[Sequence], touched: dict[str, SequenceGroup]) -> None:
        """Extend each grown sequence's text; a stop string (counted from min_tokens on) ends it.
        The text of a token that ended its sequence as a stop token is not shown."""
        now = time.time()
        for seq in seqs:
            group = seq.group
            touched[group.request_id] = group
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
            params = group.params
            if seq.finish_reason == FinishReason.STOP or (not group.stream and not params.stop):
                continue  # a stop token shows no text; unread text is decoded once, at the end
            stops = params.stop if seq.num_output_tokens >= params.min_tokens and not params.use_beam_search else []
            if self.detokenizer.append_token(seq, stops):
                if seq.is_finished:
                    seq.finish_reason = FinishReason.STOP  # the stop string wins over a length limit hit at once
                else:
                    self.scheduler.finish(seq, FinishReason.STOP)

    def _fail_plan(self, plan: SchedulerOutput, exc: Exception, touched: dict[str, SequenceGroup]) -> None:
        """Running the plan raised: every request in it (and every one swapped out by it, whose
        blocks may not have reached the CPU pool) fails; the pool gets their blocks back."""
        self.num_step_faults += 1
        self._consecutive_step_faults += 1
        cause = f"{type(exc).__name__}: {exc}"
        if self.first_fault is None:
            self.first_fault = cause
        logger.exception("a step failed; failing its %d sequence(s)", len(plan.scheduled))
        self.scheduler.abandon_plan(plan)
        groups = {id(item.seq.group): item.seq.group for item in plan.scheduled}
        groups.update((id(g), g) for g in plan.swapped_out)
        error = RequestFailedError(f"the engine failed while running this request ({type(exc).__name__})", 500)
        for group in groups.values():
            if group.request_id in self.requests:
                self._end_group(group, FinishReason.ERROR, error)
                touched[group.request_id] = group
        if self._consecutive_step_faults >= MAX_CONSECUTIVE_STEP_FAULTS:
            raise EngineDeadError(f"{self._consecutive_step_faults} steps in a row failed; first cause: "
                                  f"{self.first_fault}; last: {cause}") from exc

    def _recover_from_lost_executor(self, exc: ExecutorFailedError, touched: dict[str, SequenceGroup]) -> None:
        """The executor failed and took the KV cache with it: every request that held KV blocks
        (running or swapped, not only this plan's) fails, the pool is made whole and empty
        (cached and pinned prefixes are gone too), and the executor restarts before the next
        step, so the failed requests hear about it now rather than after the weights have loaded
        again. Waiting requests hold no KV: they run on the new executor. One that cannot be
        restarted from here (a group over several nodes): EngineDeadError, so the owner exits and
        its supervisor restarts it."""
        self.num_step_faults += 1
        self._consecutive_step_faults += 1
        cause = f"{type(exc).__name__}: {exc.summary}"
        if self.first_fault is None:
            self.first_fault = cause
        logger.error("%s failed; failing every request that held KV: %s", exc.subject, exc)
        error = RequestFailedError(f"{exc.subject} failed and this request's KV cache was lost ({exc.summary}); "
                                   "retry the request", 503)
        for group in list(self.requests.values()):
            if any(seq.status in (SequenceStatus.RUNNING, SequenceStatus.SWAPPED) for seq in group.seqs):
                self._end_group(group, FinishReason.ERROR, error)
                touched[group.request_id] = group
        self.scheduler.reset_kv_cache()
        if self.prefixes:  # their pinned KV is gone
            logger.warning("%d shared prefix(es) lost their KV with %s; register them again", len(self.prefixes),
                           exc.subject)
            self.prefixes.clear()
        if not self.executor.can_restart:
            raise EngineDeadError(f"{exc.subject} failed and cannot be restarted from the engine: {cause}") from exc
        if self._consecutive_step_faults >= MAX_CONSECUTIVE_STEP_FAULTS:
            raise EngineDeadError(f"{self._consecutive_step_faults} steps in a row failed; first cause: "
                                  f"{self.first_fault}; last: {cause}") from exc
        self._restart_executor = True

    def _check_executor(self, touched: dict[str, SequenceGroup]) -> bool:
        """Whether the executor can run this step. One that failed between steps (a rank killed
        while the engine idled) is found before anything is scheduled: with no request holding
        KV it restarts now and the step runs; otherwise those requests fail and this step only
        reports them (the executor restarts at the next step, after they heard)."""
        try:
            self.executor.check_health()
        except ExecutorFailedError as exc:
            num_touched = len(touched)
            self._recover_from_lost_executor(exc, touched)
            if len(touched) > num_touched:
                return False
            self._restart()
        return True

    def _restart(self) -> None:
        try:
            self.executor.restart()
        except Exception as exc:  # noqa: BLE001 - whatever stops the restart ends the engine
            raise EngineDeadError(f"the executor could not be restarted: {exc}") from exc
        self._restart_executor = False
        logger.info("executor restarted")

    def _end_group(self, group: SequenceGroup, reason: FinishReason, error: Exception | None = None) -> None:
        """End every unfinished sequence of the request and give back all of its blocks."""
        self.scheduler.remove_group(group)
        for seq in group.seqs:
            if not seq.is_finished:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        group.error = error

    def _expire_deadlines(self) -> dict[str, SequenceGroup]:
        now = time.time()
        expired = {g.request_id: g for g in self.requests.values() if g.deadline is not None and now > g.deadline}
        for group in expired.values():
            self._end_group(group, FinishReason.TIMEOUT)
        return expired

    def _make_output(self, group: SequenceGroup) -> RequestOutput:
        params = group.params
        finished = group.is_finished
        seqs = group.seqs
        if finished and params.use_beam_search:
            seqs = sorted(seqs, key=decoding.beam_rank_score, reverse=True)
        elif finished and len(seqs) > params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        report_cumulative = params.logprobs is not None or params.use_beam_search or not params.greedy
        if not group.stream:
            for seq in seqs[:params.n]:  # without stop strings, "stop" means a stop token ended it
                self.detokenizer.catch_up(seq, skip_last=seq.finish_reason == FinishReason.STOP)
        outputs = [
            CompletionOutput(index=i, text=self.detokenizer.visible_text(seq, params.stop),
                             token_ids=seq.output_token_ids,
                             cumulative_logprob=seq.cumulative_logprob if report_cumulative else None,
                             logprobs=list(seq.logprobs) if params.logprobs is not None else None,
                             finish_reason=seq.finish_reason)
            for i, seq in enumerate(seqs[:params.n])
        ]
        if finished:
            group.metrics.finished_time = time.time()
            self.requests.pop(group.request_id, None)
            if all(seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for seq in seqs) and not group.internal:
                self.length_profile.record(len(group.prompt_token_ids), max(s.num_output_tokens for s in seqs))
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=outputs, finished=finished,
                             metrics=group.metrics, num_cached_tokens=group.num_cached_tokens,
                             error=group.error)

    # ---- statistics ---------------------------------------------------------------------------
    def kv_stats(self) -> dict:
        """The pool, the queues and the engine's counters (see ``paged.stats``); no measurement."""
        return kv_stats_dict(self.scheduler.make_stats(), self.num_steps, self.num_step_faults,
                             self.num_generated_tokens_total, self.block_size_report()["block_size"])

    def performance_info(self) -> dict:
        """The fast paths this engine chose at load (reported by describe and the benchmarks); with
        tensor parallel, the ranks' and a ``tensor_parallel`` entry listing the ranks and their pids."""
        return self.executor.performance_info()

    # ---- shared prefixes and the block size ------------------------------------------------
    def register_prefix(self, prompt: str | list[int]) -> int:
        """Compute ``prompt`` once and pin its full blocks (see ``paged/shared_prefixes.py``);
        returns the number of tokens pinned (registering it again changes nothing). Only while no
        request is unfinished: the prefix runs as a one-token request of its own, stepped here."""
        text, token_ids = self._tokenize(prompt)
        key = tuple(token_ids)
        if key in self.prefixes:
            return self.scheduler.make_stats().kv.pinned[key].pinned_tokens
        if self.has_unfinished_requests():
            raise RuntimeError("register a shared prefix while the engine has no unfinished requests")
        self.scheduler.check_pin_fits(token_ids)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        self._check_fits(len(token_ids), params)
        request_id = f"__shared-prefix-{self._num_requests_added}"
        self._queue(request_id, text, token_ids, params, None, stream=False, internal=True)
        while request_id in self.requests:
            for out in self.step():
                if out.request_id == request_id and out.error is not None:
                    raise RuntimeError(f"computing the shared prefix failed: {out.error}") from out.error
        # The request just finished: its blocks are cached and nothing has been scheduled since.
        pinned = self.scheduler.pin_prefix(key, token_ids)
        self.prefixes.add(key, text)
        return pinned

    def unregister_prefix(self, prompt: str | list[int]) -> int:
        """Unpin a registered prefix; its blocks become evictable. Returns the tokens unpinned."""
        key = tuple(self._tokenize(prompt)[1])
        self.prefixes.remove(key)
        return self.scheduler.unpin_prefix(key)

    def shared_prefixes(self) -> list[dict]:
        """Each registered prefix: tokens, pinned tokens, and the tokens requests took from it."""
        return self.prefixes.describe(self.scheduler.make_stats().kv.pinned)

    def _measure_attention_cost(self, lengths: list[int], block_sizes) -> dict[int, float]:
        args = self.model_args
        return block_size_profile.measure_attention_cost(
            lengths, block_sizes, args.num_heads, args.num_kv_heads, args.head_dim, DTYPES[self.config.dtype],
            self.config.device, resolve_attention_backend(self.config.attention_backend, self.config.device,
                                                          args.head_dim))

    def block_size_report(self) -> dict:
        """The block size the finished requests so far recommend (None until there are
        ``MIN_REQUESTS``), with each candidate's KV utilization and measured attention cost (measured
        once, at the first call with enough requests); and what ``block_size: auto`` chose."""
        profile = self.length_profile
        report = {"block_size": None, "in_use": self.config.block_size,
                  "auto_choice": self.block_size_choice.to_dict() if self.block_size_choice else None}
        if len(profile) < block_size_profile.MIN_REQUESTS:
            report["reason"] = (f"needs {block_size_profile.MIN_REQUESTS} finished requests, "
                                f"has {len(profile)}")
            return report
        if self._attention_cost_s is None:
            self._attention_cost_s = self._measure_attention_cost(profile.decode_lengths(), profile.candidates)
        choice = block_size_profile.recommend(profile, lambda *_: self._attention_cost_s)
        report.update(choice.to_dict())
        return report

    def save_length_profile(self, path: str) -> None:
        """Write the finished requests' lengths (and the measured attention costs, if any) where
        ``block_size: "auto"`` with ``block_size_profile=path`` reads them at the next start."""
        self.length_profile.save(path, self._attention_cost_s)

    def step_timings(self) -> dict:
        """Mean ms per step in each phase (all zero unless PAGED_STEP_TIMER=1)."""
        return self.timer.report()
