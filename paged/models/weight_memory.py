"""The GEMM weights a CPU step streams, moved into one mapping on transparent huge pages.

A decode step reads every weight byte once, in order, and at a few rows that stream is the step's
time. On 4 KiB pages the stream crosses a page every 4 KiB (the 272 MB LM head of a 0.5 B Qwen2
spans 66,000 of them) and the TLB misses hold it back; on 2 MiB pages it does not. Measured on an
AMD EPYC (Zen 4, 2 threads, weights cold), every Linear of a 0.5 B Qwen2 at one row, both layouts
interleaved in one process: bf16 36.1 -> 42.9 GB/s, fp32 25.1 -> 26.6; SmolLM2-135M 22.8 -> 27.4
in both dtypes (``bench/gemm.py --pages base`` against ``--pages huge`` compares single shapes).

Every weight a plan's paths read lands in one ``AnonymousMapping`` advised ``MADV_HUGEPAGE``
(paged/os_memory.py), each at a 64-byte boundary, and the Linear then reads that copy. Each old
tensor is dropped as soon as its copy is in place, so the load holds at most one weight twice and
the model's memory does not grow. oneDNN's packed weights are opaque and stay where oneDNN put
them. Where the host has no transparent huge pages nothing moves.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from paged.os_memory import AnonymousMapping, huge_page_bytes_of_host, huge_pages_unavailable, round_up

ALIGNMENT = 64  # a cache line: the kernels' 64-byte vector loads stay aligned


@dataclass
class HugePageWeights:
    """Where the weights went: ``moved_bytes`` copied into ``mapping`` (None: nothing moved, and
    ``reason`` says why)."""

    moved_bytes: int = 0
    mapping: AnonymousMapping | None = None
    reason: str | None = None

    def describe(self) -> dict:
        """For performance_info: bytes moved and bytes the kernel backs with huge pages now."""
        if self.mapping is None:
            return {"moved_bytes": 0, "reason": self.reason}
        return {"moved_bytes": self.moved_bytes, "huge_page_bytes": self.mapping.huge_page_bytes()}


def streamed_weights(linear) -> list[str]:
    """Which tensors ``linear``'s plan reads: "packed" (the packed kernel's copy), "int8" (the
    weight of the torch int8 / dequant paths), "weight" (where F.linear runs)."""
    kinds = []
    if linear.packed is not None:
        kinds.append("packed")
    if linear.int8 is not None:
        kinds.append("int8")
    if linear.plan is not None and linear.plan.uses("torch"):
        kinds.append("weight")
    return kinds


def _get(linear, kind: str) -> torch.Tensor:
    if kind == "packed":
        return linear.packed.data
    if kind == "int8":
        return linear.int8[0]
    return linear.weight.data


def _set(linear, kind: str, tensor: torch.Tensor) -> None:
    if kind == "packed":
        linear.packed = dataclasses.replace(linear.packed, data=tensor)
    elif kind == "int8":
        linear.int8 = (tensor, *linear.int8[1:])
    else:
        linear.weight.data = tensor  # the Parameter itself: a tied embedding follows


def _arena(tensors: list[torch.Tensor]) -> tuple[AnonymousMapping, list[int]]:
    """A mapping advised MADV_HUGEPAGE with room for ``tensors``, and where each one goes."""
    offsets, size = [], 0
    for tensor in tensors:
        offsets.append(size)
        size += round_up(tensor.numel() * tensor.element_size(), ALIGNMENT)
    return AnonymousMapping(max(size, 1), alignment=huge_page_bytes_of_host(), huge_pages=True), offsets


def _copy_into(mapping: AnonymousMapping, offset: int, tensor: torch.Tensor) -> torch.Tensor:
    nbytes = tensor.numel() * tensor.element_size()
    copy = mapping.tensor()[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)
    return copy


def copy_to_huge_pages(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], AnonymousMapping]:
    """Copies of ``tensors`` (CPU, contiguous) in one new mapping advised MADV_HUGEPAGE, each at a
    64-byte boundary. The copies keep the mapping alive."""
    mapping, offsets = _arena(tensors)
    return [_copy_into(mapping, offset, tensor) for tensor, offset in zip(tensors, offsets)], mapping


def move_to_huge_pages(linears: list) -> HugePageWeights:
    """Copy the weights the Linears' plans stream into one huge-page mapping and point them there.

    Call after ``apply_plan``. Tensors shared by several Linears (tied weights) move once."""
    reason = huge_pages_unavailable()
    if reason is not None:
        return HugePageWeights(reason=reason)
    tensors: list[torch.Tensor | None] = []
    users: list[list[tuple[object, str]]] = []  # per tensor: the (linear, kind) places that read it
    index_of: dict[tuple, int] = {}
    for linear in linears:
        for kind in streamed_weights(linear):
            tensor = _get(linear, kind)
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                continue
            key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
            if key not in index_of:
                index_of[key] = len(tensors)
                tensors.append(tensor)
                users.append([])
            users[index_of[key]].append((linear, kind))
    if not tensors:
        return HugePageWeights(reason="no weight to move")
    moved_bytes = sum(t.numel() * t.element_size() for t in tensors)
    mapping, offsets = _arena(tensors)
    del tensor  # the loop's last one: it would stay referenced until the end
    for index, offset in enumerate(offsets):
        copy = _copy_into(mapping, offset, tensors[index])
        tensors[index] = None  # with the places below, the last reference to the old tensor
        for linear, kind in users[index]:
            _set(linear, kind, copy)
    return HugePageWeights(moved_bytes=moved_bytes, mapping=mapping)
