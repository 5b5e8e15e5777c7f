"""``dtype: "auto"`` (the default): the compute dtype this host runs fastest without losing range.

On a CPU with native bfloat16 dot products (the AVX512_BF16 or AMX-BF16 instructions) bfloat16
halves the bytes every decode step reads and runs at the full rate of those instructions, so auto
picks it there; elsewhere bfloat16 matmuls are emulated through float32 (slower than float32
itself), so auto picks float32. On a CUDA device auto picks bfloat16 where the device supports it,
else float32. An explicit dtype is taken as given. The choice and its reason are reported by
``LLMEngine.performance_info()`` (describe) and logged when the engine starts.
"""
from __future__ import annotations

from dataclasses import dataclass

from paged.config import torch_device_type

# /proc/cpuinfo flag names of the native bf16 dot-product instructions.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str        # a torch dtype name: "float32", "bfloat16" or "float16"
    requested: str    # what the configuration asked for ("auto" or a dtype name)
    reason: str

    def describe(self) -> dict:
        return {"dtype": self.dtype, "requested": self.requested, "reason": self.reason}


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags the kernel reports (the first processor's), or None where there is
    no such file (not Linux) or it has no flags line."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def choose_dtype(requested: str, device: str = "cpu", flags: set[str] | None = None,
                 cpuinfo_path: str = "/proc/cpuinfo") -> DtypeChoice:
    """Resolve ``requested`` ("auto" or a dtype name) for ``device``. ``flags``: the CPU's feature
    flags (default: read from ``cpuinfo_path``), given by tests to stand for other hosts."""
    if requested != "auto":
        return DtypeChoice(requested, requested, "set by the dtype setting")
    if torch_device_type(device) == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "auto", f"auto: {device} supports bfloat16")
        return DtypeChoice("float32", "auto", f"auto: {device} does not support bfloat16")
    if flags is None:
        flags = cpu_flags(cpuinfo_path)
    if flags is None:
        return DtypeChoice("float32", "auto", "auto: the CPU's features are unknown (no /proc/cpuinfo flags)")
    native = [flag for flag in CPU_BF16_FLAGS if flag in flags]
    if native:
        return DtypeChoice("bfloat16", "auto", f"auto: the CPU has native bf16 dot products ({', '.join(native)})")
    return DtypeChoice("float32", "auto", "auto: the CPU has no native bf16 dot products "
                                          f"({' or '.join(CPU_BF16_FLAGS)}); bf16 would be emulated")
