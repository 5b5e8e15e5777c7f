"""The engine's block-size advice: what ``block_size: auto`` chose at load, and what the requests
finished since then recommend (the rule and the profile: ``paged/block_size_profile.py``).

Reading the advice never measures anything: the recommendation needs attention costs per block
size, and those come from the profile file, from the timing run at load when ``block_size`` is
``"auto"`` (over the profile's lengths), or from an explicit ``measure_attention_costs()`` (a short
benchmark, run by whoever asks for it, e.g. between requests). Until then the report says so.
"""
from __future__ import annotations

from paged import block_size_profile
from paged.backends import resolve_attention_backend
from paged.block_size_profile import AttentionCostFn, BlockSizeChoice, LengthProfile
from paged.config import EngineConfig
from paged.model_runner import DTYPES
from paged.models.llama import ModelArgs


def attention_cost_fn(config: EngineConfig, args: ModelArgs) -> AttentionCostFn:
    """``measure(lengths, block_sizes)`` for this model on this engine's attention backend."""
    def measure(lengths: list[int], block_sizes) -> dict[int, float]:
        attention = resolve_attention_backend(config.attention_backend, config.device, args.head_dim)
        return block_size_profile.measure_attention_cost(lengths, block_sizes, args.num_heads, args.num_kv_heads,
                                                         args.head_dim, DTYPES[config.dtype], config.device, attention)
    return measure


class BlockSizeAdvisor:
    def __init__(self, measure: AttentionCostFn, auto_choice: BlockSizeChoice | None = None):
        """``measure(lengths, block_sizes)``: seconds of one decode-step attention per block size."""
        self.measure = measure
        self.auto_choice = auto_choice
        self.profile = LengthProfile()
        # Costs measured at load (auto) or on request; the live profile's recommendation uses them.
        self.attention_cost_s: dict[int, float] | None = (
            dict(auto_choice.attention_cost_s) if auto_choice and auto_choice.attention_cost_s else None)

    @classmethod
    def at_start(cls, block_size, profile_path: str | None, measure: AttentionCostFn) -> "BlockSizeAdvisor":
        """``block_size: "auto"``: choose from the profile at ``profile_path`` now (measuring the
        attention costs if the file has none); a number: no choice to make."""
        if block_size != "auto":
            return cls(measure)
        return cls(measure, block_size_profile.choose_at_start(profile_path, measure))

    def record(self, prompt_len: int, output_len: int) -> None:
        """A request finished normally (by a stop or a length limit)."""
        self.profile.record(prompt_len, output_len)

    def measure_attention_costs(self) -> dict[int, float]:
        """Time the attention at every candidate block size over the finished requests' lengths
        (a short benchmark on the calling thread); later reports use these costs."""
        if not len(self.profile):
            raise ValueError("no finished requests to measure over yet")
        self.attention_cost_s = self.measure(self.profile.decode_lengths(), self.profile.candidates)
        return dict(self.attention_cost_s)

    def report(self, block_size_in_use: int) -> dict:
        """The block size the finished requests recommend (None until there are ``MIN_REQUESTS``
        and attention costs), with each candidate's KV utilization and attention cost; and what
        ``block_size: auto`` chose. Counts only: never measures."""
        profile = self.profile
        report = {"block_size": None, "in_use": block_size_in_use,
                  "auto_choice": self.auto_choice.to_dict() if self.auto_choice else None}
        if len(profile) < block_size_profile.MIN_REQUESTS:
            report["reason"] = f"needs {block_size_profile.MIN_REQUESTS} finished requests, has {len(profile)}"
            return report
        costs = self.attention_cost_s
        if costs is None:
            report["utilization"] = {str(b): round(u, 4) for b, u in profile.utilizations().items()}
            report["reason"] = ("no attention costs measured yet: block_size auto measures them at load; "
                                "otherwise call LLMEngine.measure_attention_costs()")
            return report
        report.update(block_size_profile.recommend(profile, lambda *_: costs).to_dict())
        return report

    def save(self, path: str) -> None:
        """Write the finished requests' lengths (and the attention costs, if any) where
        ``block_size: "auto"`` with ``block_size_profile=path`` reads them at the next start."""
        self.profile.save(path, self.attention_cost_s)
