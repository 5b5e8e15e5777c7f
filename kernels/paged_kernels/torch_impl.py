"""The torch implementation of the kernels contract: the serving path on CPU.

Two paths with the same results. The compiled one (kernels/paged_kernels/csrc/paged_attention_cpu.cpp, built
and loaded by ``paged_kernels.cpu_extension``) reads each K/V block once, in place through the block
table, over each sequence's exact length, for every q_len in one call: decode, chunked prefill,
prefill over cached blocks and fresh prefill alike (measured faster than SDPA on dense K/V even
for a fresh 512-token prompt, so no prefill is routed to SDPA). The plain-torch one is the
fallback where the compiled kernels cannot be had (and the path for non-CPU tensors and head
dims above 256): decode tokens (q_len 1) of all sequences run as one batched, masked attention
over K/V gathered through the block tables; each sequence with several new tokens runs one SDPA
call.

The contiguous variant (``torch_contiguous_attention``) reads each sequence's K/V from one slot of
a [num_slots, max_model_len, num_kv_heads, head_dim] cache: the same compiled kernel with linear
addressing, or, as the fallback, one SDPA call per sequence on a view of its slot (no gather).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from paged_kernels import cpu_extension


MAX_COMPILED_HEAD_DIM = 256


def compiled_ops_for(device_type: str, head_dim: int):
    """``torch.ops.paged_cpu`` when its attention kernels take tensors of this device type and head
    dim (and the library loads), else None: then the plain torch path runs."""
    if device_type != "cpu" or head_dim > MAX_COMPILED_HEAD_DIM:
        return None
    return cpu_extension.load()


def _compiled_ops(tensor: torch.Tensor):
    return compiled_ops_for(tensor.device.type, tensor.shape[-1])


def _int32(index: torch.Tensor) -> torch.Tensor:
    if index.dtype == torch.int32 and index.is_contiguous():
        return index
    return index.to(torch.int32).contiguous()


def _compiled_step(workspace: dict | None, key: str, query: torch.Tensor, *indices: torch.Tensor) -> tuple:
    """(ops, *indices as contiguous int32) for the compiled kernel, () where it cannot run. The same
    for every layer of a step, so decided once and kept in the step's workspace under ``key``."""
    step = workspace.get(key) if workspace is not None else None
    if step is None:
        ops = _compiled_ops(query)
        step = (ops, *(_int32(index) for index in indices)) if ops is not None else ()
        if workspace is not None:
            workspace[key] = step
    return step


def torch_write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [num_tokens, num_kv_heads, head_dim] into flat slots; slot -1 is skipped."""
    ops = _compiled_ops(key)
    if ops is None:
        plain_write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
        return
    if key.dtype != key_cache.dtype:
        key, value = key.to(key_cache.dtype), value.to(value_cache.dtype)
    ops.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)


def torch_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: torch.Tensor,
                          query_start_loc: torch.Tensor, scale: float,
                          workspace: dict | None = None) -> torch.Tensor:
    """See ``paged_kernels.paged_attention``: the compiled kernel where it is loaded, else plain torch."""
    step = _compiled_step(workspace, "compiled_args", query, block_tables, seq_lens, query_start_loc)
    if not step:
        return plain_paged_attention(query, key_cache, value_cache, block_tables, seq_lens,
                                     query_start_loc, scale, workspace)
    ops, block_tables, seq_lens, query_start_loc = step
    return ops.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale)


def torch_contiguous_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               seq_slots: torch.Tensor, seq_lens: torch.Tensor,
                               query_start_loc: torch.Tensor, scale: float,
                               workspace: dict | None = None) -> torch.Tensor:
    """See ``paged_kernels.contiguous_attention``: the compiled kernel where it is loaded, else plain torch."""
    step = _compiled_step(workspace, "compiled_contiguous_args", query, seq_slots, seq_lens, query_start_loc)
    if not step:
        return plain_contiguous_attention(query, key_cache, value_cache, seq_slots, seq_lens, query_start_loc,
                                          scale, workspace)
    ops, seq_slots, seq_lens, query_start_loc = step
    return ops.contiguous_attention(query, key_cache, value_cache, seq_slots, seq_lens, query_start_loc, scale)


def plain_contiguous_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                               seq_slots: torch.Tensor, seq_lens: torch.Tensor,
                               query_start_loc: torch.Tensor, scale: float,
                               workspace: dict | None = None) -> torch.Tensor:
    """``torch_contiguous_attention`` in torch ops: one SDPA call per sequence on a view of its
    slot's first seq_len tokens (nothing gathered, nothing past seq_len read)."""
    out = torch.empty_like(query)
    workspace = {} if workspace is None else workspace
    if "contiguous_rows" not in workspace:
        starts = query_start_loc.tolist()
        workspace["contiguous_rows"] = [(slot, kv_len, starts[i], starts[i + 1]) for i, (slot, kv_len)
                                        in enumerate(zip(seq_slots.tolist(), seq_lens.tolist()))]
    for slot, kv_len, start, end in workspace["contiguous_rows"]:
        if end > start:
            out[start:end] = _attend_dense(query[start:end], key_cache[slot, :kv_len], value_cache[slot, :kv_len],
                                           scale)
    return out


def plain_write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                         value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """``torch_write_kv_cache`` in torch ops. Caches may be strided views (a contiguous-layout cache
    whose slots are padded to whole pages is one)."""
    if key.shape[0] == 0:
        return
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    slots = slot_mapping.to(device=key.device, dtype=torch.long)
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, key, value = slots[keep], key[keep], value[keep]
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        block_size = key_cache.shape[1]
        index = (slots // block_size, slots % block_size)
        key_cache.index_put_(index, key.to(key_cache.dtype))
        value_cache.index_put_(index, value.to(value_cache.dtype))
        return
    flat_keys = key_cache.view(-1, num_kv_heads, head_dim)
    flat_values = value_cache.view(-1, num_kv_heads, head_dim)
    flat_keys.index_copy_(0, slots, key.to(key_cache.dtype))
    flat_values.index_copy_(0, slots, value.to(value_cache.dtype))


def _gather_dense(cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[..., num_blocks] block ids -> [..., num_blocks * block_size, num_kv_heads, head_dim]."""
    gathered = cache[block_table[..., :num_blocks].long()]
    return gathered.flatten(-4, -3)


def _decode_plan(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int, block_size: int,
                 num_kv_heads: int) -> dict:
    """Gather indices and masks for one batch of decode tokens; the same for every layer."""
    num_seqs = block_tables.shape[0]
    num_blocks = -(-max_len // block_size)
    device = block_tables.device
    positions = torch.arange(num_blocks * block_size, device=device)
    slots = block_tables[:, :num_blocks].long()[:, positions // block_size] * block_size + positions % block_size
    heads = torch.arange(num_kv_heads, device=device)
    # Row (slot * num_kv_heads + head) of the cache viewed as [-1, head_dim], as [S, KVH, L].
    rows = (slots[:, None, :] * num_kv_heads + heads[None, :, None]).reshape(-1)
    invalid = positions[None, :] >= seq_lens.to(device).long()[:, None]  # [S, L]
    invalid_rows = invalid[:, None, :].expand(num_seqs, num_kv_heads, -1).reshape(-1).nonzero().squeeze(1)
    return {"rows": rows, "length": positions.numel(), "mask": invalid[:, None, None, :],
            "invalid_rows": invalid_rows}


def _batched_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    plan: dict, scale: float) -> torch.Tensor:
    """One query token per sequence: query [S, H, D] -> [S, H, D].

    One ``index_select`` gathers every (sequence, KV head)'s keys into a contiguous
    [S * KVH, L, D] tensor, the layout ``bmm`` takes without further copies; the query heads of
    a KV head (its GQA group) share that gather.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    length = plan["length"]
    keys = key_cache.view(-1, head_dim).index_select(0, plan["rows"]).view(-1, length, head_dim)
    values = value_cache.view(-1, head_dim).index_select(0, plan["rows"])
    # Slots past a sequence's end may hold anything (even NaN from an earlier owner): a zero
    # probability times NaN would still poison the sum, so those rows are zeroed.
    values = values.index_fill_(0, plan["invalid_rows"], 0.0).view(-1, length, head_dim)
    q = query.reshape(num_seqs * num_kv_heads, group, head_dim)
    scores = torch.bmm(q, keys.transpose(1, 2)).float().mul_(scale)  # [S * KVH, G, L]
    scores = scores.view(num_seqs, num_kv_heads, group, length).masked_fill_(plan["mask"], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype).view(-1, group, length)
    return torch.bmm(probs, values).view(num_seqs, num_heads, head_dim)


def _prefill_one(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_table: torch.Tensor, kv_len: int, scale: float) -> torch.Tensor:
    """The q_len new tokens of one sequence (its last positions) over kv_len keys, causal."""
    num_blocks = -(-kv_len // key_cache.shape[1])
    keys = _gather_dense(key_cache, block_table, num_blocks)[:kv_len]
    values = _gather_dense(value_cache, block_table, num_blocks)[:kv_len]
    return _attend_dense(query, keys, values, scale)


def _attend_dense(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """query [q_len, H, D], the sequence's last positions, over keys/values [kv_len, KVH, D], causal."""
    q_len, num_heads, _ = query.shape
    kv_len, num_kv_heads = keys.shape[0], keys.shape[1]
    keys, values = keys.transpose(0, 1), values.transpose(0, 1)  # [KVH, L, D]
    q = query.transpose(0, 1)  # [H, Q, D]
    if q_len == kv_len:
        mask, causal = None, True
    else:
        query_positions = torch.arange(kv_len - q_len, kv_len, device=query.device)
        mask = torch.arange(kv_len, device=query.device)[None, :] <= query_positions[:, None]
        causal = False
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                         scale=scale, enable_gqa=num_heads != num_kv_heads)
    return out.transpose(0, 1)


def plain_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          block_tables: torch.Tensor, seq_lens: torch.Tensor,
                          query_start_loc: torch.Tensor, scale: float,
                          workspace: dict | None = None) -> torch.Tensor:
    """``torch_paged_attention`` in torch ops. ``workspace``: a dict the caller passes unchanged to
    every layer of one step; the gather plan of the decode tokens is computed once and kept there."""
    out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or query.shape[0] == 0:
        return out
    workspace = {} if workspace is None else workspace
    if "q_lens" not in workspace:
        starts = query_start_loc.tolist()
        workspace["starts"] = starts
        workspace["kv_lens"] = seq_lens.tolist()
        workspace["q_lens"] = [starts[i + 1] - starts[i] for i in range(num_seqs)]
    starts, kv_lens, q_lens = workspace["starts"], workspace["kv_lens"], workspace["q_lens"]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if query.shape[0] == num_seqs:  # decode only
        if "decode_plan" not in workspace:
            workspace["decode_plan"] = _decode_plan(block_tables, seq_lens, max(kv_lens), block_size, num_kv_heads)
        return _batched_decode(query, key_cache, value_cache, workspace["decode_plan"], scale)
    decode_seqs = [i for i in range(num_seqs) if q_lens[i] == 1]
    if decode_seqs:
        if "decode_plan" not in workspace:
            index = torch.tensor(decode_seqs, device=query.device)
            workspace["decode_tokens"] = torch.tensor([starts[i] for i in decode_seqs], device=query.device)
            workspace["decode_plan"] = _decode_plan(block_tables[index], seq_lens[index],
                                                    max(kv_lens[i] for i in decode_seqs), block_size, num_kv_heads)
        tokens = workspace["decode_tokens"]
        out[tokens] = _batched_decode(query[tokens], key_cache, value_cache, workspace["decode_plan"], scale)
    for i in range(num_seqs):
        if q_lens[i] > 1:
            start, end = starts[i], starts[i + 1]
            out[start:end] = _prefill_one(query[start:end], key_cache, value_cache, block_tables[i],
                                          kv_lens[i], scale)
    return out
