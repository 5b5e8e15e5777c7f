"""Kernel tests run the Triton kernels through the Triton interpreter on CPU tensors.

triton 3.9 reads TRITON_INTERPRET when a ``@triton.jit`` function is defined (its own library
functions at ``import triton``), so it must be set before triton is first imported anywhere in
the process; the root tests/conftest.py sets it too, for test directories collected earlier.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    """Builders use their own seeded generators; this makes any stray global draw reproducible."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def bench(request):
    """The bench/ script named by the test module's ``BENCH_SCRIPT``, imported as a module (its
    ``main(argv)`` runs in-process)."""
    import importlib.util
    from pathlib import Path

    name = request.module.BENCH_SCRIPT
    path = Path(__file__).resolve().parents[2] / "bench" / name
    spec = importlib.util.spec_from_file_location(f"bench_{Path(name).stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
