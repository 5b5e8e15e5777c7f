"""Tensor parallel: Megatron-style sharded Llama layers and the torchrun-launched worker group.

See docs/tensor_parallel.md. Import the submodules directly (``paged.parallel.executor`` for the
engine's side); this package imports nothing, so ``python -m paged.parallel.launch`` arms its
parent-death signal before anything imports torch.
"""
