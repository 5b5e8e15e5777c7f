"""Builds and loads the compiled CPU kernels: every source in kernels/paged_kernels/csrc/ into one library.

``load()`` returns ``torch.ops.paged_cpu`` (attention: ``paged_attention``, ``contiguous_attention``,
``write_kv_cache``, from paged_attention_cpu.cpp; the dense layer work: ``rms_norm``,
``add_rms_norm``, ``silu_and_mul``, ``rotary_qkv``, from dense_cpu.cpp; the small-M GEMM
``packed_linear`` and ``packed_linear_out``, from packed_linear_cpu.cpp; greedy decoding's
``greedy_tokens``, from greedy_cpu.cpp; every decoder layer of a step in one call,
``decoder_layers``, from decoder_cpu.cpp) or None when the kernels cannot be had; callers
then keep the plain-torch path. The first call in a process builds (tens of seconds, once per set
of sources and headers, compiler flags, torch version and host CPU) or loads the cached library
(milliseconds): an engine calls it while loading, never inside a request.

The library is compiled for the host CPU (``-march=native``), so the host's CPU identity is part of
the cache key: a cache directory shared by machines with different CPUs never hands one of them
code it cannot run. Several processes may build at once: a file lock makes the later ones wait
for the first and the library is published by an atomic rename, so nobody ever loads a half-written
file; a lock left by a killed process is released by the kernel with the process.

No compiler, a failed build or ``PAGED_CPU_KERNELS=0`` in the environment: one log line, None.
The library calls torch's own OpenMP runtime, so ``torch.set_num_threads`` governs it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
LIBRARY_NAME = "paged_cpu"
BUILD_TIMEOUT_S = 600
# torch's headers need C++20 from torch 2.14 on (2.13's build with it too).
LANGUAGE_STANDARD = "-std=c++20"
# Tried in order; the portable set is for a compiler that rejects -march=native.
FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=fast"],
    ["-O3", "-ffp-contract=fast"],
)

_lock = threading.Lock()
_state: dict = {}  # "ops": the loaded namespace or None, once decided


def load():
    """``torch.ops.paged_cpu`` once built and loaded in this process, else None (logged once)."""
    if "ops" in _state:  # every layer of every step asks: no lock once decided
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _build_and_load()
        return _state["ops"]


def _build_and_load():
    if os.environ.get("PAGED_CPU_KERNELS", "1") == "0":
        logger.info("PAGED_CPU_KERNELS=0: the compiled CPU kernels (attention, dense layer ops) are off; torch ops run instead")
        return None
    try:
        path = _library_path()
        torch.ops.load_library(str(path))
        return getattr(torch.ops, LIBRARY_NAME)
    except Exception as exc:  # any failure leaves the plain-torch path, which is always correct
        logger.warning("compiled CPU kernels unavailable (%s); CPU attention runs on the plain-torch path",
                       str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        return None


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not found)")
    return cxx


def _host_cpu() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line.strip() for line in lines if line.split(":")[0].strip() in keys}))


def _build_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / "paged_cpu"


def _command(cxx: str, flags: list[str], output: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    lib_dirs = library_paths()
    command = [cxx, *flags, LANGUAGE_STANDARD, "-shared", "-fPIC", "-fopenmp", "-w",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    for include in include_paths():
        command += ["-isystem", include]
    command += [str(path) for path in _sources()] + ["-o", str(output)]
    for lib_dir in lib_dirs:
        command += [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"]
    return command + ["-lc10", "-ltorch_cpu"]


def _sources() -> list[Path]:
    """The translation units compiled into the library."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def _source_digest() -> bytes:
    """Every source and header by name and content: any edit gives another cache key."""
    digest = hashlib.sha256()
    for path in sorted([*SOURCE_DIR.glob("*.cpp"), *SOURCE_DIR.glob("*.h")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.digest()


def _library_path() -> Path:
    """The cached library for these sources, torch and CPU, built first if missing."""
    cxx = _compiler()
    source = _source_digest()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join([cxx, LANGUAGE_STANDARD, *flags]).encode(), torch.__version__.encode(),
                                         _host_cpu().encode()])).hexdigest()[:16]
        directory = _build_root() / key
        library = directory / f"{LIBRARY_NAME}.so"
        if library.exists():
            return library
        directory.mkdir(parents=True, exist_ok=True)
        with _file_lock(directory / "build.lock"):
            if library.exists():  # another process built it while we waited
                return library
            error = _compile(cxx, flags, directory, library)
            if error is None:
                return library
            errors.append(error)
    raise RuntimeError("build failed: " + " | ".join(errors))


def _compile(cxx: str, flags: list[str], directory: Path, library: Path) -> str | None:
    """Compiles into a private file, then renames it into place; returns an error line or None."""
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
    os.close(fd)
    started = time.perf_counter()
    try:
        result = subprocess.run(_command(cxx, flags, Path(tmp)), capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            (directory / "build.log").write_text(result.stderr)
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            return f"{' '.join(flags)}: {last} (log: {directory / 'build.log'})"
        os.replace(tmp, library)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(flags)}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built the CPU kernels (%s) in %.1f s: %s", " ".join(flags), time.perf_counter() - started, library)
    return None


class _file_lock:
    """An exclusive advisory lock on ``path`` (none where fcntl is missing: the rename keeps it safe)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock
        return False
