"""LLMEngine: add_request / abort_request / step over the scheduler, the executor and the decoder.

A step is one pipeline, each stage in its own module:
``Scheduler.schedule()`` -> plan -> ``Executor.execute(plan)`` -> logits -> ``Decoder.decide`` ->
``Scheduler.update_from_output`` -> ``OutputProcessor`` (text, stop strings) -> ``RequestOutput``s.

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

from paged.block_size_advisor import BlockSizeAdvisor, attention_cost_fn
from paged.config import EngineConfig
from paged.decoding import Decoder
from paged.dtype_choice import choose_dtype
from paged.errors import (EngineDeadError, EngineOverloadedError, ExecutorFailedError, InvalidRequestError,
                          RequestFailedError)
from paged.executor import make_executor
from paged.input_processor import InputProcessor
from paged.kv_manager import make_kv_manager
from paged.kv_sizing import PreemptionCostModel, plan_kv_cache
from paged.models.gguf_checkpoint import DequantizedCheckpoint
from paged.models.llama import ModelArgs
from paged.output_processor import OutputProcessor
from paged.outputs import FinishReason, RequestOutput
from paged.request_validator import RequestLimits, RequestValidator
from paged.sampler import Sampler
from paged.sampling_params import SamplingParams
from paged.scheduler import Scheduler
from paged.scheduler_output import SchedulerOutput
from paged.sequence import SequenceGroup, SequenceStatus
from paged.shared_prefixes import SharedPrefixRegistry
from paged.stats import kv_stats_dict
from paged.step_timer import StepTimer

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAULTS = 3
# A shared prefix is computed as the prefill of a one-token request of its own.
_PREFIX_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


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
        # dtype "auto" becomes a dtype here, before anything sizes or loads by it
        self.dtype_choice = choose_dtype(config.dtype, config.device)
        config = dataclasses.replace(config, dtype=self.dtype_choice.dtype)
        logger.info("dtype: %s (%s)", self.dtype_choice.dtype, self.dtype_choice.reason)
        # a .gguf file is dequantized into a temporary checkpoint directory that lives as long as
        # this engine (removed by close()); everything below reads that directory
        self.checkpoint = DequantizedCheckpoint(config.model, config.dtype)
        if self.checkpoint.path != config.model:
            logger.info("GGUF %s dequantized into %s", config.model, self.checkpoint.path)
            config = dataclasses.replace(config, model=self.checkpoint.path)
        self.model_args = args = ModelArgs.from_checkpoint(config.model)
        self.block_size_advisor = BlockSizeAdvisor.at_start(config.block_size, config.block_size_profile,
                                                            attention_cost_fn(config, args))
        choice = self.block_size_advisor.auto_choice
        if choice is not None:
            config = dataclasses.replace(config, block_size=choice.block_size)
            logger.info("block_size auto: %d (%s)", config.block_size, choice.reason)
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        limits = RequestLimits.for_model(config, args)
        self.vocab_size, self.max_model_len = limits.vocab_size, limits.max_model_len
        layout = plan_kv_cache(config, args, self.max_model_len)
        self.eos_token_ids = _eos_token_ids(config.model, args, self.tokenizer)
        kv_manager = make_kv_manager(config, layout, args)
        self.scheduler = Scheduler(config, kv_manager, PreemptionCostModel.for_model(args), self.eos_token_ids,
                                   self.max_model_len)
        torch.manual_seed(config.seed)
        self.timer = StepTimer()
        self.executor = make_executor(config, args, layout, self.timer, kv_manager.shared_memory)
        self.decoder = Decoder(Sampler(self.eos_token_ids), self.eos_token_ids, self._new_seq_id)
        self.input_processor = InputProcessor(config, self.tokenizer, RequestValidator(limits), self.scheduler,
                                              self._new_seq_id)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.requests: dict[str, SequenceGroup] = {}
        self.prefixes = SharedPrefixRegistry()
        self._next_seq_id = 0
        self.num_steps = 0
        self.num_generated_tokens_total = 0
        self.num_step_faults = 0
        self._consecutive_step_faults = 0
        self.first_fault: str | None = None
        self._restart_executor = False
        self.closed = False

    def close(self) -> None:
        """Shut the executor down (tensor-parallel ranks stop; in process there is nothing to stop).
        Idempotent; ``step`` raises EngineDeadError afterwards."""
        self.closed = True
        self.executor.shutdown()
        self.checkpoint.cleanup()

    # ---- requests -----------------------------------------------------------------------------
    def validate_request(self, prompt: str | list[int], params: SamplingParams) -> tuple[str | None, list[int]]:
        """Everything ``add_request`` checks about the request itself, without queueing it:
        returns (prompt text or None, prompt token ids) or raises InvalidRequestError."""
        return self.input_processor.validate(prompt, params)

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
        text, token_ids = self.input_processor.validate(prompt, params)
        self._queue(self.input_processor.make_group(request_id, text, token_ids, params, arrival_time, stream))

    def _queue(self, group: SequenceGroup) -> None:
        self.requests[group.request_id] = group
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
                    for seq in self.output_processor.detokenize(grown, touched):
                        self.scheduler.finish(seq, FinishReason.STOP)
                self.scheduler.record_kv_usage()
        with self.timer.phase("outputs"):
            outputs = [self._output(g) for g in touched.values() if g.stream or g.is_finished]
        self.timer.step_done()
        return outputs

    def _output(self, group: SequenceGroup) -> RequestOutput:
        output = self.output_processor.make_output(group)
        if output.finished:
            self.requests.pop(group.request_id, None)
            seqs = group.seqs
            if not group.internal and all(s.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for s in seqs):
                self.block_size_advisor.record(len(group.prompt_token_ids), max(s.num_output_tokens for s in seqs))
        return output

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

    # ---- faults -------------------------------------------------------------------------------
    def _count_fault(self, cause: str) -> None:
        self.num_step_faults += 1
        self._consecutive_step_faults += 1
        if self.first_fault is None:
            self.first_fault = cause

    def _check_fault_budget(self, cause: str, exc: Exception) -> None:
        """EngineDeadError after ``MAX_CONSECUTIVE_STEP_FAULTS`` failed steps in a row."""
        if self._consecutive_step_faults >= MAX_CONSECUTIVE_STEP_FAULTS:
            raise EngineDeadError(f"{self._consecutive_step_faults} steps in a row failed; first cause: "
                                  f"{self.first_fault}; last: {cause}") from exc

    def _fail_plan(self, plan: SchedulerOutput, exc: Exception, touched: dict[str, SequenceGroup]) -> None:
        """Running the plan raised: every request in it (and every one swapped out by it, whose
        blocks may not have reached the CPU pool) fails; the pool gets their blocks back."""
        cause = f"{type(exc).__name__}: {exc}"
        self._count_fault(cause)
        logger.exception("a step failed; failing its %d sequence(s)", len(plan.scheduled))
        self.scheduler.abandon_plan(plan)
        groups = {id(item.seq.group): item.seq.group for item in plan.scheduled}
        groups.update((id(g), g) for g in plan.swapped_out)
        error = RequestFailedError(f"the engine failed while running this request ({type(exc).__name__})", 500)
        for group in groups.values():
            if group.request_id in self.requests:
                self._end_group(group, FinishReason.ERROR, error)
                touched[group.request_id] = group
        self._check_fault_budget(cause, exc)

    def _recover_from_lost_executor(self, exc: ExecutorFailedError, touched: dict[str, SequenceGroup]) -> None:
        """The executor failed and took the KV cache with it: every request that held KV blocks
        (running or swapped, not only this plan's) fails, the pool is made whole and empty
        (cached and pinned prefixes are gone too), and the executor restarts before the next
        step, so the failed requests hear about it now rather than after the weights have loaded
        again. Waiting requests hold no KV: they run on the new executor. One that cannot be
        restarted from here (a group over several nodes): EngineDeadError, so the owner exits and
        its supervisor restarts it."""
        cause = f"{type(exc).__name__}: {exc.summary}"
        self._count_fault(cause)
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
        self._check_fault_budget(cause, exc)
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

    # ---- statistics ---------------------------------------------------------------------------
    def kv_stats(self) -> dict:
        """The pool, the queues and the engine's counters (see ``paged.stats``). Counts only:
        nothing is measured."""
        return kv_stats_dict(self.scheduler.make_stats(), self.num_steps, self.num_step_faults,
                             self.num_generated_tokens_total, self.block_size_report()["block_size"])

    def performance_info(self) -> dict:
        """The fast paths this engine chose at load (reported by describe and the benchmarks); with
        tensor parallel, the ranks' and a ``tensor_parallel`` entry listing the ranks and their pids;
        ``kv_memory``: the memory model, its granularity and what it refuses; ``dtype``: the compute
        dtype, what was asked for and why (see ``paged.dtype_choice``)."""
        return {**self.executor.performance_info(), "kv_memory": self.scheduler.kv_manager.describe(),
                "dtype": self.dtype_choice.describe()}

    def step_timings(self) -> dict:
        """Mean ms per step in each phase (all zero unless PAGED_STEP_TIMER=1)."""
        return self.timer.report()

    # ---- shared prefixes ----------------------------------------------------------------------
    def register_prefix(self, prompt: str | list[int]) -> int:
        """Compute ``prompt`` once and pin its full blocks (see ``paged/shared_prefixes.py``);
        returns the number of tokens pinned (registering it again changes nothing). Only while no
        request is unfinished: the prefix runs as a one-token request of its own, stepped here."""
        text, token_ids = self.input_processor.tokenize(prompt)
        key = tuple(token_ids)
        if key in self.prefixes:
            return self.scheduler.make_stats().kv.pinned[key].pinned_tokens
        if self.has_unfinished_requests():
            raise RuntimeError("register a shared prefix while the engine has no unfinished requests")
        self.scheduler.check_pin_fits(token_ids)
        self.input_processor.check(len(token_ids), _PREFIX_PARAMS)
        request_id = f"__shared-prefix-{self.input_processor.num_requests}"
        self._queue(self.input_processor.make_group(request_id, text, token_ids, _PREFIX_PARAMS, None,
                                                    stream=False, internal=True))
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
        key = tuple(self.input_processor.tokenize(prompt)[1])
        self.prefixes.remove(key)
        return self.scheduler.unpin_prefix(key)

    def shared_prefixes(self) -> list[dict]:
        """Each registered prefix: tokens, pinned tokens, and the tokens requests took from it."""
        return self.prefixes.describe(self.scheduler.make_stats().kv.pinned)

    # ---- the block size -----------------------------------------------------------------------
    def block_size_report(self) -> dict:
        """What ``block_size: auto`` chose, and the block size the finished requests recommend
        (see ``paged/block_size_advisor.py``). Never measures anything."""
        return self.block_size_advisor.report(self.config.block_size)

    def measure_attention_costs(self) -> dict[int, float]:
        """Time one decode-step attention at every candidate block size over the finished
        requests' lengths (a short benchmark, on this thread: call it between requests); the
        block-size report uses these costs from then on."""
        return self.block_size_advisor.measure_attention_costs()

    def save_length_profile(self, path: str) -> None:
        """Write the finished requests' lengths (and the attention costs, if any) where
        ``block_size: "auto"`` with ``block_size_profile=path`` reads them at the next start."""
        self.block_size_advisor.save(path)
