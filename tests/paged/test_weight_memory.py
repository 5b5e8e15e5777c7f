"""paged/models/weight_memory.py: the weights a CPU step streams move into one mapping on
transparent huge pages, the layers compute exactly what they did, and nothing moves where the host
has no huge pages."""
from __future__ import annotations

import pytest
import torch

from paged import os_memory
from paged.models.llama import LlamaForCausalLM
from paged.models.weight_memory import move_to_huge_pages
from paged.os_memory import huge_pages_unavailable
from paged_kernels.linear import Linear, LinearPlan

needs_huge_pages = pytest.mark.skipif(huge_pages_unavailable() is not None,
                                      reason=f"{huge_pages_unavailable()}: nothing to move")


def planned_linears(path: str, dtype: torch.dtype, tie: bool = False) -> list[Linear]:
    torch.manual_seed(0)
    linears = [Linear(64, 96, bias=True), Linear(96, 64, bias=False), Linear(64, 96, bias=False)]
    if tie:
        linears[2].weight = linears[0].weight
    for linear in linears:
        linear.to(dtype).requires_grad_(False)
        linear.apply_plan(LinearPlan.everywhere(path, dtype))
    return linears


def outputs(linears: list[Linear], dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [linear(torch.randn(3, linear.in_features, generator=gen).to(dtype)) for linear in linears]


def inside(tensor: torch.Tensor, mapping) -> bool:
    start = tensor.data_ptr()
    return mapping.address <= start and start + tensor.numel() * tensor.element_size() <= mapping.address + mapping.size


@needs_huge_pages
@pytest.mark.parametrize("path,dtype", [("packed", torch.float32), ("packed", torch.bfloat16),
                                        ("torch", torch.float32)])
def test_streamed_weights_move_into_the_mapping_and_results_stay_bit_identical(path, dtype):
    linears = planned_linears(path, dtype)
    before = outputs(linears, dtype)
    moved = move_to_huge_pages(linears)
    streamed = [linear.packed.data if path == "packed" else linear.weight for linear in linears]
    assert all(inside(tensor, moved.mapping) for tensor in streamed)
    assert moved.moved_bytes == sum(t.numel() * t.element_size() for t in streamed)
    assert all(torch.equal(a, b) for a, b in zip(before, outputs(linears, dtype)))


@needs_huge_pages
def test_a_tied_weight_moves_once_and_stays_shared():
    linears = planned_linears("torch", torch.float32, tie=True)
    moved = move_to_huge_pages(linears)
    assert linears[2].weight is linears[0].weight and inside(linears[0].weight, moved.mapping)
    assert moved.moved_bytes == (96 * 64 + 64 * 96) * 4  # linear 0 (and 2, tied) and linear 1


@needs_huge_pages
def test_the_model_reports_its_weights_on_huge_pages(tiny_llama_dir):
    model = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir), torch.float32, linear_backend="packed")
    report = model.weight_memory.describe()
    packed_bytes = sum(linear.packed.data.numel() * 4 for linear in model.linears())
    assert report["moved_bytes"] == packed_bytes
    assert 0 <= report["huge_page_bytes"] <= model.weight_memory.mapping.size


def test_nothing_moves_without_transparent_huge_pages(monkeypatch):
    monkeypatch.setattr(os_memory, "transparent_huge_page_mode", lambda: "never")
    linears = planned_linears("packed", torch.float32)
    before = [linear.packed.data for linear in linears]
    moved = move_to_huge_pages(linears)
    assert moved.mapping is None and "off on this host" in moved.describe()["reason"]
    assert all(linear.packed.data is tensor for linear, tensor in zip(linears, before))
