"""64-bit addressing: a pool of more than 2**31 elements per cache, K/V in blocks whose element
offset does not fit in int32. The caches are torch.empty (untouched pages cost no memory).

Both checks run in one subprocess (write first, then attention): with 32-bit offsets the kernels
would read/write far outside the pool and could crash the interpreter, which must not take the
whole test run down.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from paged_kernels.reference import reference_paged_attention
from paged_kernels.triton_attention import triton_paged_attention
from paged_kernels.triton_cache import triton_write_kv_cache

block_size, num_kv_heads, head_dim = 16, 1, 64
num_blocks = 2**21 + 4  # 2**31 + 4096 elements: offsets past block 2**21 overflow int32
try:
    key_cache = torch.empty(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.float16)
    value_cache = torch.empty_like(key_cache)
except (RuntimeError, MemoryError):
    print("SKIP: cannot reserve the address space")
    sys.exit(0)
g = torch.Generator().manual_seed(0)
kv_len = 40
blocks = [num_blocks - 1, 3, num_blocks - 3]
slots = torch.tensor([blocks[i // block_size] * block_size + i % block_size for i in range(kv_len)],
                     dtype=torch.int32)
key = torch.randn(kv_len, num_kv_heads, head_dim, generator=g).half()
value = torch.randn(kv_len, num_kv_heads, head_dim, generator=g).half()
triton_write_kv_cache(key, value, key_cache, value_cache, slots)
ok = (torch.equal(key_cache.view(-1, num_kv_heads, head_dim)[slots.long()], key)
      and torch.equal(value_cache.view(-1, num_kv_heads, head_dim)[slots.long()], value))
print("write", "OK" if ok else "WRONG", flush=True)
key_cache.view(-1, num_kv_heads, head_dim)[slots.long()] = key
value_cache.view(-1, num_kv_heads, head_dim)[slots.long()] = value
args = (torch.randn(3, 4, head_dim, generator=g).half(), key_cache, value_cache,
        torch.tensor([blocks], dtype=torch.int32), torch.tensor([kv_len], dtype=torch.int32),
        torch.tensor([0, 3], dtype=torch.int32), head_dim ** -0.5)
expected = reference_paged_attention(*args).float()
for num_splits in (1, 2):
    out = triton_paged_attention(*args, num_splits=num_splits).float()
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
print("attention OK", flush=True)
"""


@pytest.fixture(scope="module")
def large_pool_run():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    if result.stdout.startswith("SKIP"):
        pytest.skip(result.stdout.strip())
    return result


def _expect(result, line):
    assert line in result.stdout.splitlines(), (
        f"exit code {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}")


def test_write_kv_cache_past_2_31_elements(large_pool_run):
    _expect(large_pool_run, "write OK")


def test_paged_attention_reads_blocks_past_2_31_elements(large_pool_run):
    _expect(large_pool_run, "attention OK")
