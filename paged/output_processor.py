"""After the model and the decoder: text for the new tokens, stop strings, and what callers get.

Runs beside the step (``LLMEngine.step``), on the sequences that grew: incremental detokenizing
(``paged/detokenizer.py``), stop strings counted from ``min_tokens`` on, and a ``RequestOutput``
for every request that produced text or finished. Stop tokens end sequences in the scheduler,
with the token; a stop string can only be seen once the text exists, so it is found here and
``detokenize`` returns the running sequences it ended, for the scheduler to finish.

Requests without stop strings that nobody reads before they end (``stream=False``) skip the
per-step detokenizing: their text is decoded once, when they finish (``Detokenizer.catch_up``).
"""
from __future__ import annotations

import time

from paged import decoding
from paged.detokenizer import Detokenizer
from paged.outputs import CompletionOutput, FinishReason, RequestOutput
from paged.sequence import Sequence, SequenceGroup


class OutputProcessor:
    def __init__(self, tokenizer):
        self.detokenizer = Detokenizer(tokenizer)

    def detokenize(self, seqs: list[Sequence], touched: dict[str, SequenceGroup]) -> list[Sequence]:
        """Extend each grown sequence's text and mark its request touched. Returns the running
        sequences a stop string ended (the caller finishes them); a sequence that a length limit
        ended in the same step gets ``STOP`` (the stop string wins). The text of a token that
        ended its sequence as a stop token is not shown."""
        now = time.time()
        stopped = []
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
                    seq.finish_reason = FinishReason.STOP
                else:
                    stopped.append(seq)
        return stopped

    def make_output(self, group: SequenceGroup) -> RequestOutput:
        """The request's output now: its ``n`` best sequences once finished (beams by normalized
        score, ``best_of`` samples by cumulative logprob), fresh lists every time."""
        params = group.params
        finished = group.is_finished
        seqs = group.seqs
        if finished and params.use_beam_search:
            seqs = sorted(seqs, key=decoding.beam_rank_score, reverse=True)
        elif finished and len(seqs) > params.n:
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)
        report_cumulative = params.logprobs is not None or params.use_beam_search or not params.greedy
        if not group.stream:
            for seq in seqs[:params.n]:  # without stop strings, STOP means a stop token ended it
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
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=outputs, finished=finished,
                             metrics=group.metrics, num_cached_tokens=group.num_cached_tokens,
                             error=group.error)
