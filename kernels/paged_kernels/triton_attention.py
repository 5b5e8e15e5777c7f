"""Triton paged attention: one kernel for decode, prefill, chunked prefill and prefill over
cached prefix blocks, plus a split-K (flash-decoding) path with a reduction kernel.

Work decomposition
------------------
* The packed query tokens of each sequence are cut into tiles of ``BLOCK_Q`` tokens. A program
  handles one (query tile, KV head[, KV split]) and processes all ``GROUP = num_heads //
  num_kv_heads`` query heads of that KV head together: the tile's rows are (token, head) pairs,
  ``BLOCK_M = max(16, BLOCK_Q * GROUP_PAD)`` rows, so each K/V tile is loaded once per KV head
  and reused by the whole group (GQA / MQA).
* Grid dimension 0 needs no host sync: sequence ``s`` owns tiles starting at
  ``query_start_loc[s] // BLOCK_Q + s`` (``query_start_loc[s]`` when BLOCK_Q == 1), which is an
  upper bound on the tiles before it, so ``num_tokens // BLOCK_Q + num_seqs`` programs cover
  every sequence; a program binary-searches ``query_start_loc`` for its sequence and leaves if
  its tile is past the sequence's end.
* K/V are read ``BLOCK_N`` tokens at a time through the block table with a per-token gather
  (physical block = table[pos // block_size], offset = pos % block_size), so any block size
  1..256 works, blocks may sit anywhere in the pool, and tiles may span several blocks.
  Block ids are widened to int64 before they are multiplied by the block stride.
* Contiguous layout (``triton_contiguous_attention``, constexpr ``CONTIGUOUS``): the caches are
  [num_slots, max_model_len, num_kv_heads, head_dim] and the "block table" is one slot id per
  sequence; K/V tiles are then read at ``slot * slot_stride + pos * token_stride``, no table load
  per token. Everything else is the same kernel.
* Online softmax (FlashAttention-style) in base 2: running max ``m``, sum ``l`` and an fp32
  accumulator; the scale is folded with log2(e). Fully masked rows are guarded (no NaN).
* The new tokens of a sequence are its last ``q_len`` positions: row position
  ``kv_len - q_len + i`` sees keys ``<= position``; a tile's loop stops at its last row's
  position, so causal prefill does about half the work of a full one.
* head_dim is padded to the next power of two (>= 16) with masked loads/stores.

Split-K (flash decoding)
------------------------
With few (query tile, KV head) programs and a long context the GPU would sit mostly idle, so
the KV range of each tile is cut into ``num_splits`` chunks (multiples of BLOCK_N), each
program writes its unnormalised fp32 accumulator and (m, l) to scratch, and a second kernel
merges them: ``out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s``. See
``choose_num_splits`` for the heuristic; ``num_splits=`` forces it.

bf16 under the Triton interpreter
---------------------------------
``tl.dot`` on bfloat16 operands is wrong under ``TRITON_INTERPRET=1`` (triton 3.9), so when
interpreting, bf16 tiles are upcast to fp32 before ``tl.dot`` (constexpr ``DOT_FP32``); on a GPU
the native bf16 dot with fp32 accumulation is used. fp32 inputs use IEEE fp32 dots (no TF32) so
the fp32 path matches the reference tightly.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Split-K heuristic constants (see choose_num_splits).
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 16
DEFAULT_NUM_SMS = 132  # used when the tensors are not on a GPU (the interpreter): an H100's count


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale,  # softmax scale * log2(e)
    num_seqs, num_heads, block_size, num_splits,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_SPLIT: tl.constexpr, DOT_FP32: tl.constexpr, IEEE_DOT: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Which sequence owns this query tile: the last s with tile_start(s) <= tile.
    lo = tile * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if BLOCK_Q == 1:
            mid_start = tl.load(query_start_loc_ptr + mid)
        else:
            mid_start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        before = mid_start <= tile
        lo = tl.where(before, mid, lo)
        hi = tl.where(before, hi, mid - 1)
    seq = lo
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if BLOCK_Q == 1:
        q_tile_start = tile - q_start
    else:
        q_tile_start = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if q_tile_start >= q_len:
        return
    kv_len = tl.load(seq_lens_ptr + seq)
    context_len = kv_len - q_len

    # Rows of the tile: (token, head of the group) pairs.
    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // GROUP_PAD
    row_head = rows % GROUP_PAD
    tok = q_tile_start + row_tok  # token index within the sequence
    row_ok = (row_tok < BLOCK_Q) & (tok < q_len) & (row_head < GROUP)
    head = kv_head * GROUP + row_head
    q_pos = context_len + tok  # absolute position of each row's token

    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    token_idx = (q_start + tok).to(tl.int64)
    q_offs = token_idx[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :] * stride_qd
    q = tl.load(q_ptr + q_offs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    # KV range of this tile (causal: up to its last row's position), then of this split.
    kv_end = context_len + tl.minimum(q_tile_start + BLOCK_Q, q_len)
    # (plain integer arithmetic rather than tl.cdiv / tl.zeros: under the interpreter every
    # nested @jit helper call costs milliseconds)
    per_split = (kv_end + num_splits - 1) // num_splits
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    kv_lo = split * chunk
    kv_hi = tl.minimum(kv_end, kv_lo + chunk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, DIM_PAD], 0.0, tl.float32)

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    cols = tl.arange(0, BLOCK_N)
    k_head = kv_head.to(tl.int64) * stride_kh
    v_head = kv_head.to(tl.int64) * stride_vh
    if CONTIGUOUS:  # one slot per sequence: its base address, once
        slot = tl.load(table).to(tl.int64)
        k_head += slot * stride_kb
        v_head += slot * stride_vb
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + cols
        pos_ok = pos < kv_hi
        if CONTIGUOUS:
            k_offs = pos.to(tl.int64) * stride_ks + k_head
            v_offs = pos.to(tl.int64) * stride_vs + v_head
        else:
            block = tl.load(table + pos // block_size, mask=pos_ok, other=0).to(tl.int64)
            offset = (pos % block_size).to(tl.int64)
            k_offs = block * stride_kb + offset * stride_ks + k_head
            v_offs = block * stride_vb + offset * stride_vs + v_head
        k = tl.load(k_cache_ptr + k_offs[None, :] + dims[:, None] * stride_kd,
                    mask=pos_ok[None, :] & dim_ok[:, None], other=0.0)  # [DIM_PAD, BLOCK_N]
        v = tl.load(v_cache_ptr + v_offs[:, None] + dims[None, :] * stride_vd,
                    mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_N, DIM_PAD]
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE_DOT:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * qk_scale
        allowed = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if IEEE_DOT:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if IS_SPLIT:
        # Scratch layout: acc [num_tokens, num_heads, num_splits, DIM_PAD], m/l without DIM_PAD.
        part = (token_idx * num_heads + head) * num_splits + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * DIM_PAD + dims[None, :], acc, mask=row_ok[:, None])
    else:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_offs = token_idx[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    num_heads, num_splits,
    stride_ot, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """One program per (token, KV head) merges the split partials of the group's heads."""
    token = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    group_heads = tl.arange(0, GROUP_PAD)
    head = kv_head * GROUP + group_heads
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    ok = (group_heads[:, None] < GROUP) & (splits[None, :] < num_splits)  # [GROUP_PAD, SPLITS_PAD]
    part = (token * num_heads + head[:, None]) * num_splits + splits[None, :]

    m = tl.load(part_m_ptr + part, mask=ok, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, :, None] * DIM_PAD + dims[None, None, :],
                  mask=ok[:, :, None], other=0.0)  # [GROUP_PAD, SPLITS_PAD, DIM_PAD]
    m_max = tl.max(m, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_max[:, None])  # 0 for empty splits (m = -inf)
    denom = tl.sum(weight * l, 1)
    denom = tl.where(denom == 0.0, 1.0, denom)
    out = tl.sum(acc * weight[:, :, None], 1) / denom[:, None]  # [GROUP_PAD, DIM_PAD]
    o_offs = token * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty),
             mask=(group_heads[:, None] < GROUP) & (dims[None, :] < HEAD_DIM))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_mode(dtype: torch.dtype, interpreting: bool) -> tuple[bool, bool]:
    """(DOT_FP32, IEEE_DOT) for the kernel: bf16 tiles are upcast to fp32 before ``tl.dot`` only
    under the interpreter (its bf16 dot is broken); GPUs use the native bf16 dot. fp32 inputs
    use IEEE fp32 dots, not TF32."""
    return interpreting and dtype == torch.bfloat16, dtype == torch.float32


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def choose_block_q(num_tokens: int, num_seqs: int, group: int, max_rows: int = 64) -> int:
    """Query tokens per tile: 1 for a decode-only batch, else about the mean q_len, capped so
    a tile holds at most ``max_rows`` (token, head) rows. Host-side ints only (no GPU sync)."""
    if num_seqs == 0 or num_tokens <= num_seqs:
        return 1
    group_pad = triton.next_power_of_2(group)
    mean_q = -(-num_tokens // num_seqs)
    return max(1, min(triton.next_power_of_2(mean_q), max_rows // group_pad))


def choose_num_splits(num_programs: int, max_kv_len: int, num_sms: int) -> int:
    """Split-K factor for a launch of ``num_programs`` (query tile, KV head) programs whose
    longest KV range is at most ``max_kv_len`` tokens.

    Split only when the launch cannot fill the GPU (fewer programs than SMs), into enough
    splits to reach about two programs per SM, but keep at least MIN_TOKENS_PER_SPLIT keys per
    split (below that the merge costs more than it saves) and at most MAX_SPLITS.
    ``max_kv_len`` comes from the block-table width, so no device sync is needed: the engine
    pads block tables to the batch's longest sequence, so it is a close bound.
    """
    if num_programs == 0 or num_programs >= num_sms:
        return 1
    wanted = -(-2 * num_sms // num_programs)
    splits = min(wanted, max_kv_len // MIN_TOKENS_PER_SPLIT, MAX_SPLITS)
    return max(1, splits)


class LaunchPlan(NamedTuple):
    group: int        # query heads per KV head
    group_pad: int    # next power of two
    dim_pad: int      # head_dim padded to a power of two >= 16
    block_q: int      # query tokens per tile
    block_m: int      # rows per tile: max(16, block_q * group_pad)
    block_n: int      # keys per inner step
    num_tiles: int    # grid dimension 0 (an upper bound; surplus programs exit at once)
    num_splits: int   # split-K factor (1 = single pass, no merge kernel)


def plan_launch(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int,
                block_size: int, max_blocks_per_seq: int, device: torch.device, *,
                num_splits: int | None = None, block_q: int | None = None,
                block_n: int | None = None) -> LaunchPlan:
    """Tile sizes, grid and split-K factor from shapes alone (no device sync)."""
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    dim_pad = max(16, triton.next_power_of_2(head_dim))
    if block_q is None:
        # head_dim 256: half the rows, so the fp32 accumulator stays in registers
        block_q = choose_block_q(num_tokens, num_seqs, group, max_rows=32 if dim_pad >= 256 else 64)
    if block_q < 1 or block_q & (block_q - 1):
        raise ValueError(f"block_q must be a power of two, got {block_q}")
    block_m = max(16, block_q * group_pad)
    if block_n is None:
        block_n = 32 if dim_pad >= 256 else 64
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    num_tiles = num_tokens if block_q == 1 else num_tokens // block_q + num_seqs
    if num_splits is None:
        num_splits = choose_num_splits(num_tiles * num_kv_heads, max_blocks_per_seq * block_size,
                                       _num_sms(device))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return LaunchPlan(group, group_pad, dim_pad, block_q, block_m, block_n, num_tiles, num_splits)


def _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc):
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_dim], got {tuple(query.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(f"key_cache/value_cache must both be [num_blocks, block_size, num_kv_heads, "
                         f"head_dim], got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {key_cache.shape[3]}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must be [num_seqs + 1] = [{num_seqs + 1}], "
                         f"got {tuple(query_start_loc.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [num_seqs={num_seqs}, max_blocks_per_seq], "
                         f"got {tuple(block_tables.shape)}")


def triton_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float, *,
                           num_splits: int | None = None, block_q: int | None = None,
                           block_n: int | None = None) -> torch.Tensor:
    """See ``paged_kernels.paged_attention``. Keyword-only knobs for tests and tuning:
    ``num_splits`` forces the split-K factor (1 = no split), ``block_q`` the query tokens per
    tile (power of two), ``block_n`` the keys per inner step (power of two, >= 16)."""
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc)
    return _launch(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, False,
                   num_splits=num_splits, block_q=block_q, block_n=block_n)


def triton_contiguous_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                seq_slots: torch.Tensor, seq_lens: torch.Tensor,
                                query_start_loc: torch.Tensor, scale: float, *,
                                num_splits: int | None = None, block_q: int | None = None,
                                block_n: int | None = None) -> torch.Tensor:
    """See ``paged_kernels.contiguous_attention``; the knobs are ``triton_paged_attention``'s."""
    if seq_slots.dim() != 1 or seq_slots.shape != seq_lens.shape:
        raise ValueError(f"seq_slots must be [num_seqs={seq_lens.shape[0]}], got {tuple(seq_slots.shape)}")
    # The slot ids as a one-column table: grid and split-K planning see blocks of max_model_len.
    table = seq_slots.view(-1, 1)
    _check_inputs(query, key_cache, value_cache, table, seq_lens, query_start_loc)
    return _launch(query, key_cache, value_cache, table, seq_lens, query_start_loc, scale, True,
                   num_splits=num_splits, block_q=block_q, block_n=block_n)


def _launch(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale: float,
            contiguous: bool, *, num_splits: int | None, block_q: int | None, block_n: int | None) -> torch.Tensor:
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out

    # int32 index tensors per the contract; int64 is accepted (narrowed here, a small copy).
    block_tables = block_tables.to(torch.int32)
    seq_lens = seq_lens.to(torch.int32)
    query_start_loc = query_start_loc.to(torch.int32)

    plan = plan_launch(num_tokens, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                       block_tables.shape[1], query.device, num_splits=num_splits, block_q=block_q,
                       block_n=block_n)
    group, group_pad, dim_pad = plan.group, plan.group_pad, plan.dim_pad
    num_splits, is_split = plan.num_splits, plan.num_splits > 1

    if is_split:
        part_acc = torch.empty((num_tokens, num_heads, num_splits, dim_pad), dtype=torch.float32,
                               device=query.device)
        part_m = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused

    dot_fp32, ieee_dot = dot_mode(query.dtype, _interpreting())
    if query.is_cuda:
        num_warps = 8 if plan.block_m * dim_pad >= 128 * 128 else 4
        launch = dict(num_warps=num_warps, num_stages=2)
    else:
        launch = {}

    _paged_attention_kernel[(plan.num_tiles, num_kv_heads, num_splits)](
        query, key_cache, value_cache, out,
        part_acc, part_m, part_l,
        block_tables, seq_lens, query_start_loc,
        float(scale) * LOG2E,
        num_seqs, num_heads, block_size, num_splits,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *out.stride(),
        block_tables.stride(0),
        HEAD_DIM=head_dim, DIM_PAD=dim_pad, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        IS_SPLIT=is_split, DOT_FP32=dot_fp32, IEEE_DOT=ieee_dot, CONTIGUOUS=contiguous,
        **launch,
    )
    if is_split:
        _merge_splits_kernel[(num_tokens, num_kv_heads)](
            out, part_acc, part_m, part_l,
            num_heads, num_splits, *out.stride(),
            HEAD_DIM=head_dim, DIM_PAD=dim_pad, GROUP=group, GROUP_PAD=group_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
        )
    return out
